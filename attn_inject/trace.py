"""Per-module torch.fx tracing: one module's own forward, with every child module as a leaf.

Many whole models cannot be traced (data-dependent control flow, shape-dependent Python), while
their blocks trace fine; tracing module by module patches what can be patched. A module is traced
on a detached shallow copy, so tracing never writes into the user's model (some models cache
tensors in dicts during forward, and a Proxy stored there would poison later calls). timm's notrace
functions are traced as leaf calls, and its notrace modules stay leaves, as every child is.
"""

from __future__ import annotations

import copy
import math
import types
from functools import lru_cache

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none

from .ops import is_inplace
from .patched import TensorSeq, add_shortcut, patched_forward


class TraceFailure(Exception):
    """Raised inside the library when a module's own forward cannot be traced (becomes a reason)."""


@lru_cache(maxsize=1)
def _timm_notrace_functions() -> tuple:
    from timm.layers import get_notrace_functions

    return tuple(get_notrace_functions())


def _leaf_functions() -> tuple:
    """Functions traced as single calls: timm's notrace registry and attn_inject's own helper."""
    return _timm_notrace_functions() + (add_shortcut,)


class _ChildrenAsLeaves(fx.Tracer):
    def __init__(self, method: str):
        super().__init__(autowrap_modules=(math,), autowrap_functions=_leaf_functions())
        self.traced_func_name = method

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_module(module: nn.Module, method: str, fixed: frozenset, training: bool) -> tuple[fx.Graph, dict]:
    """Trace ``module.<method>`` with children as leaves and the ``fixed`` (name, value) arguments baked in.

    A method already patched by attn_inject, or bound on the instance at runtime, is traced from the
    function the instance really runs, so injections compose. Lists/tuples of tensors are fixed by
    their structure (one placeholder per element). The placeholders of fixed arguments keep their
    names and fx's asserts on them are dropped (the patched forward picks a graph by these values
    instead). In-place updates are made explicit.
    Returns the graph and the constants fx stored on the traced copy (``_tensor_constant0``...),
    which the graph reads with get_attr and which must be set on the module when it is patched.
    """
    plain = patched_forward(module, method) is None and bound_on_instance(module, method) is None
    if plain and method == "forward" and not fixed and type(module).forward is nn.Sequential.forward:
        return _sequential_graph(module), {}  # what fx would trace, without its per-trace patching of nn.Module
    clone = _detached_copy(module, training)
    function = _instance_function(module, method, fixed, training)
    mode = _ModeReads(training)
    members = {"training": property(mode.get, mode.set)}  # notes whether the forward reads self.training
    if function is not None:  # trace what the instance really runs, not the class's method
        members[method] = function
    clone.__class__ = type(type(module).__name__, (type(module),), members)
    concrete = {name: value.placeholders() if isinstance(value, TensorSeq) else value for name, value in fixed}
    try:
        graph = _ChildrenAsLeaves(method).trace(clone, concrete_args=concrete)
    except Exception as exc:  # tracing user code can fail in any way; the reason is reported
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise TraceFailure(f"{type(exc).__name__}: {first_line}".rstrip(": ")) from None
    if not hasattr(graph._codegen, "pytree_info"):  # list arguments keep fx's flattened names
        _rename_fixed_placeholders(graph, {name for name, _ in fixed})
    _drop_specialization_asserts(graph)
    explicit_inplace(graph, module)
    graph.reads_training = mode.read  # False: the other mode traces to the same graph
    constants = {k: v for k, v in clone.__dict__.items() if k not in module.__dict__ and k != "__class__"}
    return graph, constants


def _sequential_graph(module: nn.Sequential) -> fx.Graph:
    """The graph of ``nn.Sequential.forward``: each child called on the previous one's output.

    Built directly: tracing patches ``nn.Module.__call__`` / ``__getattr__`` on the class, which
    costs milliseconds per trace in a process with many module classes, and a detection model has
    hundreds of Sequentials (torchvision's Conv2dNormActivation).
    """
    graph = fx.Graph()
    value = graph.placeholder("input")
    for name, _ in module.named_children():
        value = graph.call_module(name, (value,))
    graph.output(value)
    graph.reads_training = False
    return graph


class _ModeReads:
    """The ``training`` flag of a traced copy, remembering whether the traced code read it."""

    def __init__(self, training: bool):
        self.training, self.read = training, False

    def get(self, _module: nn.Module) -> bool:
        self.read = True
        return self.training

    def set(self, _module: nn.Module, value: bool) -> None:
        self.training = value


def _instance_function(module: nn.Module, method: str, fixed: frozenset, training: bool):
    """The function behind an instance-level ``method``: a previous attn_inject patch, or a method
    bound at runtime (``self.forward = self.forward_split_cat``). None when the class's runs."""
    installed = patched_forward(module, method)
    if installed is not None:
        code = installed.code_for(fixed, training)
        if code is None:
            raise TraceFailure("called with arguments its previous patch was never traced for")
        return code.fn
    bound = bound_on_instance(module, method)
    return bound.__func__ if bound is not None else None


def bound_on_instance(module: nn.Module, method: str) -> types.MethodType | None:
    """``module.<method>`` when the instance binds it at runtime (FasterNet's Partial_conv3)."""
    bound = module.__dict__.get(method)
    return bound if isinstance(bound, types.MethodType) and bound.__self__ is module else None


def _rename_fixed_placeholders(graph: fx.Graph, fixed_names: set[str]) -> None:
    """fx names the placeholder of a fixed argument ``<name>_1``: give it its parameter name back."""
    for node in graph.find_nodes(op="placeholder"):
        base = node.target.rsplit("_", 1)[0]
        if node.target not in fixed_names and base in fixed_names:
            node.target = base


def _drop_specialization_asserts(graph: fx.Graph) -> None:
    """Drop fx's asserts on fixed arguments: the patched forward picks a graph by their values."""
    for node in list(graph.nodes):
        is_check = node.target is _assert_is_none or (
            node.target is torch._assert and "has been specialized" in str(node.args[1:2])
        )
        if node.op == "call_function" and is_check and not node.users:
            inputs = [a for a in node.all_input_nodes if a.op != "placeholder"]
            graph.erase_node(node)
            for arg in inputs:
                if not arg.users:
                    graph.erase_node(arg)


def _detached_copy(module: nn.Module, training: bool) -> nn.Module:
    """A shallow copy whose containers (caches, hook and submodule dicts) are copies too."""
    clone = copy.copy(module)
    clone.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in module.__dict__.items()}
    clone.training = training
    return clone


def explicit_inplace(graph: fx.Graph, module: nn.Module) -> None:
    """Make in-place updates explicit in the data flow.

    ``out.add_(y); return out`` traces to a graph whose output is ``out``'s node, not the add's:
    the update is only visible through mutation. Rewiring the later uses of a mutated value to the
    in-place node (which returns that same tensor) keeps the semantics and lets a block be inserted
    after the update instead of before it.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not node.args or not isinstance(node.args[0], fx.Node) or not is_inplace(node, module.get_submodule):
            continue
        target = node.args[0]
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
