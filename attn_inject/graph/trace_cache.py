"""One trace per module structure: modules built alike trace to the same graph.

A ResNet-50 has 16 bottlenecks but four structures (first of a stage or not, ...); a detection
model has hundreds of identical norm-act units. Tracing patches ``nn.Module`` on the class and runs
the forward with Proxies — milliseconds each — so the analysis traces each structure once and hands
every module of that structure its own copy of the graph (nodes carry per-module metadata later).

Two modules share a structure when everything a trace of one can read is equal: the class, every
plain attribute (simple values by value, anything else by identity: a shared function or config
object), the names, shapes, dtypes and devices of parameters and buffers, and the same, recursively,
for every child (a forward may read ``self.conv.stride``). A method bound on the instance or
installed by an earlier inject makes a module its own structure. Traces that stow tensor constants
on the module are not shared. Failures are shared too: the same code fails the same way.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..patched import patched_forward
from .trace import TraceFailure, TraceResult, bound_on_instance, trace_module

_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}
_SIMPLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


class TraceCache:
    """``trace_module`` with its results shared between modules of one structure (one analysis)."""

    def __init__(self) -> None:
        self._structures: dict[int, int] = {}  # id(module) -> structure number
        self._numbers: dict[tuple, int] = {}  # structure -> its number
        self._traces: dict[tuple, TraceResult | TraceFailure | None] = {}  # None: not shared (constants)

    def trace(self, module: nn.Module, method: str, fixed: frozenset, training: bool) -> TraceResult:
        """What ``trace_module`` returns; the graph is the caller's own copy."""
        if patched_forward(module, method) is not None or bound_on_instance(module, method) is not None:
            return trace_module(module, method, fixed, training)
        typed = frozenset((name, type(value), value) for name, value in fixed)  # 1, 1.0 and True are equal keys
        key = (self.structure(module), method, typed, training)
        cached = self._traces.get(key, ...)
        if isinstance(cached, TraceFailure):
            raise TraceFailure(str(cached))
        if isinstance(cached, TraceResult):
            return _copy(cached)
        try:
            traced = trace_module(module, method, fixed, training)
        except TraceFailure as exc:
            self._traces[key] = exc
            raise
        self._traces[key] = None if traced.constants else _copy(traced)
        return traced

    def structure(self, module: nn.Module) -> int:
        """A number shared by exactly the modules of one structure (see the module docstring).

        Memoised per module: the root is traced first, so every module's number is fixed before the
        analysis puts its stand-in forwards on the children of an untraceable module."""
        number = self._structures.get(id(module))
        if number is None:
            attributes = tuple(
                (name, value_key(value)) for name, value in module.__dict__.items() if name not in _MODULE_INTERNALS
            )
            tensors = tuple(
                (name, _tensor_key(t)) for name, t in (*module._parameters.items(), *module._buffers.items())
            )
            children = tuple(
                (name, None if child is None else self.structure(child)) for name, child in module._modules.items()
            )
            signature = (type(module), attributes, tensors, children)
            number = self._numbers.setdefault(signature, len(self._numbers))
            self._structures[id(module)] = number
        return number


def _copy(traced: TraceResult) -> TraceResult:
    """A result of its own: a deep copy of the graph (nodes get per-module metadata later)."""
    return TraceResult(copy.deepcopy(traced.graph), {}, traced.reads_training)


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    return type(t), tuple(t.shape), t.dtype, t.device, t.requires_grad


def value_key(value: Any) -> tuple:
    """Simple values (and tuples/lists of them) by type and value; anything else by identity."""
    if type(value) is float:
        return float, value.hex()  # 0.0 and -0.0 are equal, yet a forward may tell them apart
    if type(value) in _SIMPLE:
        return type(value), value
    if type(value) in (tuple, list, frozenset):
        items = tuple(value_key(v) for v in value)
        if all(item[0] is not id for item in items):
            return type(value), items
    return id, id(value)
