"""Per-module torch.fx tracing: one module's own forward, with every child module as a leaf.

Many whole models cannot be traced (data-dependent control flow, shape-dependent Python), while
their blocks trace fine; tracing module by module patches what can be patched. A module is traced
on a detached shallow copy, so tracing never writes into the user's model (some models cache
tensors in dicts during forward, and a Proxy stored there would poison later calls). timm's notrace
functions are traced as leaf calls, and its notrace modules stay leaves, as every child is.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import types
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from timm.layers import get_notrace_functions
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict

from ..errors import one_line
from ..fx_compat import is_none_check, pytree_info
from ..patched import TensorSeq, add_shortcut, patched_forward
from .nodes import is_inplace
from .preserve import rng_states, same_rng, set_rng_states


class TraceFailure(Exception):
    """Raised inside the library when a module's own forward cannot be traced (becomes a reason)."""


@dataclass
class TraceResult:
    """One module's traced forward."""

    graph: fx.Graph
    constants: dict[str, Any] = field(default_factory=dict)  # tensors fx stowed on the traced copy
    reads_training: bool = True  # False: the forward never read self.training, both modes trace alike


@lru_cache(maxsize=1)
def _timm_notrace_functions() -> tuple:
    return tuple(get_notrace_functions())


def _leaf_functions() -> tuple:
    """Functions traced as single calls: timm's notrace registry and attn_inject's own helper."""
    return (*_timm_notrace_functions(), add_shortcut)


class _ChildrenAsLeaves(fx.Tracer):
    def __init__(self, method: str):
        super().__init__(autowrap_modules=(math,), autowrap_functions=_leaf_functions())
        self.traced_func_name = method
        self.proxy_buffer_attributes = True  # in-place updates of buffers (counters) become graph nodes
        self.stowed: set[str] = set()  # attributes fx itself set on the traced copy

    def get_fresh_qualname(self, prefix: str) -> str:
        name = super().get_fresh_qualname(prefix)
        self.stowed.add(name)
        return name

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def create_arg(self, a: Any) -> Any:
        """Keep a dict subclass's type: fx lowers every dict to a plain one, so a traced module that
        returns a ``ModelOutput`` (Hugging Face) or an ``OrderedDict`` would return a dict, and its
        parent's ``out[0]`` / ``out.pooler_output`` would fail. The graph builds it with its class."""
        if isinstance(a, dict) and type(a) not in (dict, immutable_dict):
            entries: Any = super().create_arg(dict(a))
            if all(isinstance(k, str) and k.isidentifier() for k in entries):
                return self.create_node("call_function", type(a), (), entries)
            return self.create_node("call_function", type(a), (entries,), {})
        return super().create_arg(a)


def trace_module(module: nn.Module, method: str, fixed: frozenset, training: bool) -> TraceResult:
    """Trace ``module.<method>`` with children as leaves and the ``fixed`` (name, value) arguments baked in.

    A method already patched by attn_inject, or bound on the instance at runtime, is traced from the
    function the instance really runs, so injections compose. Lists/tuples of tensors are fixed by
    their structure (one placeholder per element). The placeholders of fixed arguments keep their
    names and fx's asserts on them are dropped (the patched forward picks a graph by these values
    instead). In-place updates are made explicit.
    The result holds the constants fx stored on the traced copy (``_tensor_constant0``...), which
    the graph reads with get_attr and which must be set on the module when it is patched.
    """
    plain = patched_forward(module, method) is None and bound_on_instance(module, method) is None
    if plain and method == "forward" and not fixed and type(module).forward is nn.Sequential.forward:
        # what fx would trace, without its per-trace patching of nn.Module
        return TraceResult(_sequential_graph(module), reads_training=False)
    clone = _detached_copy(module, training)
    function = _instance_function(module, method, fixed, training)
    mode = _ModeReads(training)
    members = {"training": property(mode.get, mode.set)}  # notes whether the forward reads self.training
    if function is not None:  # trace what the instance really runs, not the class's method
        members[method] = function
    clone.__class__ = type(type(module).__name__, (type(module),), members)
    concrete = {name: value.placeholders() if isinstance(value, TensorSeq) else value for name, value in fixed}
    tracer = _ChildrenAsLeaves(method)
    versions = _tensor_versions(module)
    rng = rng_states()
    try:
        graph = tracer.trace(clone, concrete_args=concrete)
    except Exception as exc:  # tracing user code can fail in any way; the reason is reported
        raise TraceFailure(one_line(exc)) from None
    finally:
        drew = not same_rng(rng_states(), rng)
        set_rng_states(rng)
    _buffer_updates_in_place(module, clone, graph)
    if not _output_nodes(graph):
        raise TraceFailure(
            "its result does not depend on its inputs or children "
            "(it is read from Python state, e.g. collected by forward hooks)"
        )
    lost = _unrecorded_effects(module, clone, tracer.stowed, versions) or (
        "draws random numbers fx runs once at trace time" if drew else None
    )
    if lost:  # the graph would leave this out: the module keeps its own forward
        raise TraceFailure(f"its forward {lost}, which a traced graph would not repeat")
    if pytree_info(graph) is None:  # list arguments keep fx's flattened names
        _rename_fixed_placeholders(graph, {name for name, _ in fixed})
    _drop_specialization_asserts(graph)
    explicit_inplace(graph, module)
    constants = {k: v for k, v in clone.__dict__.items() if k not in module.__dict__ and k != "__class__"}
    return TraceResult(graph, constants, reads_training=mode.read)


# ``self.steps += 1`` on a buffer: fx records ``steps + 1`` and rebinds the attribute to its Proxy;
# on a tensor Python's ``+=`` updates it in place, so the graph gets the in-place method instead.
_IN_PLACE_OF = {operator.add: "add_", operator.sub: "sub_", operator.mul: "mul_", operator.truediv: "div_"}


def _buffer_updates_in_place(module: nn.Module, clone: nn.Module, graph: fx.Graph) -> None:
    """Turn ``buffer += value`` (``-=``, ``*=``, ``/=``) into an in-place update node of the graph, as
    ``buffer.add_(value)`` traces, and give the traced copy its buffer back (fx rebound it to a Proxy)."""
    for name, value in list(clone._buffers.items()):
        if not isinstance(value, fx.Proxy) or not isinstance(module._buffers.get(name), torch.Tensor):
            continue
        node = value.node
        method = _IN_PLACE_OF.get(node.target) if node.op == "call_function" else None
        read = node.args[0] if node.args else None
        if method is None or not isinstance(read, fx.Node) or (read.op, read.target) != ("get_attr", name):
            continue  # another value bound to the buffer: reported as setting it
        with graph.inserting_after(node):
            update = graph.call_method(method, node.args, dict(node.kwargs))
        node.replace_all_uses_with(update)
        graph.erase_node(node)
        clone._buffers[name] = module._buffers[name]


def _tensor_versions(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """The version counter of each tensor the module holds itself (parameters, buffers, attributes)."""
    tensors = {**module._parameters, **module._buffers, **module.__dict__}
    return {k: (t, t._version) for k, t in tensors.items() if isinstance(t, torch.Tensor)}


def _unrecorded_effects(module: nn.Module, clone: nn.Module, stowed: set[str], versions: dict) -> str | None:
    """What running the forward once at trace time did to the module that the graph does not record:
    a tensor written in place outside the graph, a Python attribute set or a container changed."""
    for name, (tensor, version) in versions.items():
        if tensor._version != version:
            return f"writes tensor attribute {name!r} in place outside the traced graph"
    for name, value in clone.__dict__.items():
        if name in stowed or name == "training":
            continue
        if name not in module.__dict__:
            return f"sets attribute {name!r}"
        original = module.__dict__[name]
        if _changed(original, value):
            copied = type(value) is type(original) and (
                isinstance(original, (dict, list, set)) or _is_helper_object(original)
            )
            return f"{'changes the contents of' if copied else 'sets'} attribute {name!r}"
    return None


def _changed(original: Any, value: Any, depth: int = 1) -> bool:
    """Whether the traced copy's ``value`` of an attribute differs from the module's ``original``,
    seeing through the copies ``_detached_value`` made (containers, helper objects' __dict__)."""
    if value is original:
        return False
    if isinstance(original, (dict, list, set)):
        return not _same_items(original, value)
    if depth and _is_helper_object(original) and type(value) is type(original) and hasattr(value, "__dict__"):
        a, b = vars(original), vars(value)
        return a.keys() != b.keys() or any(_changed(a[k], b[k], depth - 1) for k in a)
    return True


def _same_items(a: dict | list | set, b: Any) -> bool:
    """Shallow equality by identity (containers may hold tensors, whose == is elementwise)."""
    if type(a) is not type(b) or len(a) != len(b):
        return False
    if isinstance(a, dict):
        return all(k in b and b[k] is v for k, v in a.items())  # type: ignore[index]  # b is a dict too
    if isinstance(a, list):
        return all(x is y for x, y in zip(a, b))
    return a == b


def _output_nodes(graph: fx.Graph) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    fx.node.map_arg(graph.output_node().args, nodes.append)
    return nodes


def _sequential_graph(module: nn.Module) -> fx.Graph:
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
        is_check = is_none_check(node.target) or (
            node.target is torch._assert and "has been specialized" in str(node.args[1:2])
        )
        if node.op == "call_function" and is_check and not node.users:
            inputs = [a for a in node.all_input_nodes if a.op != "placeholder"]
            graph.erase_node(node)
            for arg in inputs:
                if not arg.users:
                    graph.erase_node(arg)


def _detached_copy(module: nn.Module, training: bool) -> nn.Module:
    """A shallow copy whose containers (caches, hook and submodule dicts) are copies too, and so
    are helper objects' containers (timm's FeatureHooks keeps the outputs its hooks collect in a
    dict: tracing ``self.hooks.get_output(x.device)`` would store a Proxy key there)."""
    clone = copy.copy(module)
    clone.__dict__ = {k: _detached_value(v) for k, v in module.__dict__.items()}
    clone.training = training
    return clone


def _detached_value(value: Any, depth: int = 1) -> Any:
    if isinstance(value, (dict, list, set)):
        return copy.copy(value)
    if depth and _is_helper_object(value):
        try:
            clone = copy.copy(value)
            clone.__dict__ = {k: _detached_value(v, depth - 1) for k, v in vars(value).items()}
            return clone
        except Exception:  # an object that cannot be copied is shared, as before
            return value
    return value


def _is_helper_object(value: Any) -> bool:
    """An instance of a user class holding state in its __dict__ (not a module, tensor, function...)."""
    return hasattr(value, "__dict__") and not isinstance(
        value,
        (nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType, types.ModuleType, functools.partial),
    )


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
