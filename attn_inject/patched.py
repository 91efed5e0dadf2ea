"""The forward of a patched module: an edited fx graph run with the module itself as ``self``.

Splicing never swaps a module for a GraphModule. The edited graph's Python code is compiled into
a plain function and stored on the same module object as the instance attribute ``forward``
(``forward_features`` for a timm model's own features), so the module keeps its class, attributes,
methods and state_dict keys, and there are no hooks. The object below is that attribute: it
survives ``copy.deepcopy`` and pickling (it is rebuilt from its source, as fx's GraphModule is),
``torch.compile``, ``torch.export`` and ``torch.jit.trace`` (they see ordinary Python).

A module traced with some arguments fixed (``None`` as DLA's ``shortcut=None``, a list of tensors
as HRNet's branches, a size tuple as Twins' ``PosConv``) or whose forward differs between train
and eval keeps one compiled graph per case and picks by the call; a call it was never traced for
falls back to the forward it replaced.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .fx_compat import compile_forward, import_block, pytree_info

# A traced case: the arguments fixed at trace time, as (name, value) pairs, and the training flag
# the graph is for (None: the same graph serves both modes).
Variant = tuple[frozenset, "bool | None"]


@dataclass(frozen=True)
class TensorSeq:
    """A list or tuple of tensors, fixed at trace time by its type and length only; or a dict of
    tensors, by its type and keys (in order)."""

    kind: type
    length: int
    keys: tuple[str, ...] | None = None

    def placeholders(self) -> Any:
        """What fx's ``concrete_args`` takes to trace one placeholder per element."""
        if self.keys is not None:
            return self.kind((key, fx.PH) for key in self.keys)
        return self.kind(fx.PH for _ in range(self.length))


class GraphCode:
    """Python source of one fx graph, compiled to ``forward(self, ...)``; picklable by source.

    A graph traced with list arguments flattens and rebuilds them with pytree specs that fx's code
    reads from ``self._in_spec``; here they are globals of the function, since ``self`` is the user's
    module.
    """

    def __init__(self, src: str, globals_: dict[str, Any], specs: dict[str, Any] | None = None):
        self.src = src
        self.globals = globals_
        self.specs = specs or {}
        self.fn: Callable[..., Any] = compile_forward(src, {**globals_, **self.specs})

    @classmethod
    def from_graph(cls, graph: fx.Graph) -> GraphCode:
        code = graph.python_code(root_module="self")
        src, specs = code.src, {}
        info = pytree_info(graph)
        if info is not None:
            src = src.replace("self._in_spec", "_attn_inject_in_spec").replace(
                "self._out_spec", "_attn_inject_out_spec"
            )
            specs = {"_attn_inject_in_spec": info.in_spec, "_attn_inject_out_spec": info.out_spec}
        return cls(src, code.globals, specs)

    def __reduce__(self):
        return (_graph_code_from_imports, (self.src, import_block(self.globals), self.specs))


def _graph_code_from_imports(src: str, imports: str, specs: dict[str, Any] | None = None) -> GraphCode:
    globals_: dict[str, Any] = {}
    exec(imports, globals_)
    del globals_["__builtins__"]  # exec adds it; it is not a name of the graph's code (and not importable)
    return GraphCode(src, globals_, specs)


class PatchedForward:
    """Callable stored as ``module.<method>``: runs the edited graph for this call's variant."""

    def __init__(self, module: nn.Module, method: str, variants: dict[Variant, GraphCode], previous: Any = None):
        self.module = module
        self.method = method
        self.variants = variants
        self.previous = previous  # the instance attribute this replaced, or None for the class method
        first = next(iter(variants.values()))
        params = list(inspect.signature(first.fn).parameters.values())[1:]
        self.__signature__ = inspect.Signature(params)
        fixed = {name for items, _ in variants for name, _ in items}
        # Arguments a variant fixes, or that may be None: read from each call to pick the variant.
        self._slots = [
            (p.name, i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None, p.default)
            for i, p in enumerate(params)
            if p.name in fixed or (p.default is None and p.kind is not p.VAR_KEYWORD)
        ]
        by_mode = any(mode is not None for _, mode in variants)
        self._single = first.fn if len(variants) == 1 and not self._slots and not by_mode else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._single is not None:
            return self._single(self.module, *args, **kwargs)
        code = self.code_for_call(args, kwargs)
        if code is None:
            return self.call_previous(*args, **kwargs)
        return code.fn(self.module, *args, **kwargs)

    def code_for_call(self, args: tuple, kwargs: dict) -> GraphCode | None:
        """The graph traced for this call's fixed arguments and mode, if there is one."""
        values = {
            name: args[index] if index is not None and index < len(args) else kwargs.get(name, default)
            for name, index, default in self._slots
        }
        for (items, mode), code in self.variants.items():
            if mode is not None and mode != self.module.training:
                continue
            fixed = dict(items)
            if all(_same(values[name], value) for name, value in items) and all(
                values[name] is not None for name in values if name not in fixed
            ):
                return code
        return None

    def call_previous(self, *args: Any, **kwargs: Any) -> Any:
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return getattr(type(self.module), self.method)(self.module, *args, **kwargs)

    def code_for(self, fixed: frozenset, training: bool) -> GraphCode | None:
        """The graph traced for exactly these fixed arguments, in this mode."""
        return self.variants.get((fixed, training)) or self.variants.get((fixed, None))

    def __reduce__(self):
        return (PatchedForward, (self.module, self.method, self.variants, self.previous))

    def __repr__(self) -> str:
        return f"<attn_inject patched {type(self.module).__name__}.{self.method}: {len(self.variants)} graph(s)>"


def add_shortcut(branch: torch.Tensor, shortcut: torch.Tensor, branch_first: bool) -> torch.Tensor:
    """The residual add after a spliced block, in place into the block's fresh output.

    fx records ``out += shortcut`` as an out-of-place add; adding into the block's output (a new
    tensor nothing else reads) saves a map per block and is bitwise the same sum. Where the two
    layouts differ (they can change with the batch size), the out-of-place add in the original
    order is kept: its result takes a layout of its own, and later kernels depend on it.
    """
    if branch.stride() == shortcut.stride() and branch.dtype == shortcut.dtype and branch.shape == shortcut.shape:
        return branch.add_(shortcut)
    return branch + shortcut if branch_first else shortcut + branch


class Absent:
    """Marks an instance attribute that was not there (a class: it stays itself through deepcopy and pickle)."""


def _same(value: Any, fixed: Any) -> bool:
    if fixed is None:
        return value is None
    if isinstance(fixed, TensorSeq):
        if not isinstance(value, (list, tuple, dict)) or type(value) is not fixed.kind or len(value) != fixed.length:
            return False
        return fixed.keys is None or tuple(value) == fixed.keys
    return type(value) is type(fixed) and value == fixed


def patched_forward(module: nn.Module, method: str) -> PatchedForward | None:
    """The PatchedForward installed on ``module.<method>``, if any."""
    value = module.__dict__.get(method)
    return value if isinstance(value, PatchedForward) else None
