"""Calls of untraceable modules: the conv -> norm (-> act) units a module that fx cannot trace calls itself.

Such a module runs eagerly (transformers' MobileNetV1ConvLayer computes TF-"same" padding with
``int(x.shape[-2])``), so its own convs, norms and activations are in no graph. Their calls are
observed instead: a unit is a conv whose output tensor is the input of a norm, whose output is
the input of an activation (or a conv straight into an activation). The block goes after the
unit's activation, whose own forward is traced and edited. So the activation must be called once
by its parent and not in place (its caller may ignore its return value); a norm cannot be the
edited module (``_BatchNorm.forward`` checks the input's dims in Python, which fx cannot trace),
so units without such an activation are not found.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .nodes import LearnedOp, join_path, module_kind, module_op


@dataclass
class PrimitiveCall:
    path: str
    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor


@dataclass(frozen=True)
class OpaqueUnit:
    ops: tuple[LearnedOp, ...]  # the conv, and the norm if there is one
    end: PrimitiveCall  # the activation, whose forward gets the block


class PrimitiveCalls:
    """Records the calls a module makes to its own conv / norm / activation children while
    ``active()`` says so (forward hooks, removed on exit)."""

    def __init__(self, module: nn.Module, path: str, active: Callable[[], bool]):
        self.calls: list[PrimitiveCall] = []
        self.handles = []
        for sub_path, sub in _own_primitives(module):
            self.handles.append(sub.register_forward_hook(self._hook(join_path(path, sub_path), active)))

    def _hook(self, path: str, active: Callable[[], bool]):
        def record(module, args, output):
            if active() and args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                self.calls.append(PrimitiveCall(path, module, args[0], output))

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _own_primitives(module: nn.Module, prefix: str = ""):
    """Conv, norm and activation modules the module itself may call: children, and the members
    of its ModuleList / ModuleDict children (not those inside a child with a forward of its own)."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if module_kind(child) in ("conv", "norm", "act"):
            yield path, child
        elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _own_primitives(child, path + ".")


def conv_units(calls: list[PrimitiveCall]) -> list[OpaqueUnit]:
    """conv -> norm (-> act) chains among the calls, by tensor identity."""
    times_called = Counter(id(c.module) for c in calls)
    consumers: dict[int, list[PrimitiveCall]] = {}
    for call in calls:
        consumers.setdefault(id(call.input), []).append(call)

    def next_of(call: PrimitiveCall, kind: str) -> PrimitiveCall | None:
        users = consumers.get(id(call.output), [])
        return users[0] if len(users) == 1 and module_kind(users[0].module) == kind else None

    units = []
    for conv in calls:
        if module_kind(conv.module) != "conv" or conv.output.dim() not in (3, 4, 5):  # NCL, NCHW, NCDHW
            continue
        norm = next_of(conv, "norm")
        act = next_of(norm or conv, "act")
        if act is None or times_called[id(act.module)] != 1 or getattr(act.module, "inplace", False):
            continue
        ops = [module_op(conv.module, conv.path, tuple(conv.output.shape))]
        if norm is not None:
            ops.append(module_op(norm.module, norm.path, tuple(norm.output.shape)))
        units.append(OpaqueUnit(tuple(op for op in ops if op is not None), act))
    return units
