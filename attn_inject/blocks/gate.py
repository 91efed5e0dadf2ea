"""The gate shared by the blocks: ``x * gain * gate(z)``, gate a sigmoid or a hard sigmoid.

With ``gain = 2`` the factor is ``2 * gate(z) = 1 + centred(z)``: ``1 + tanh(z / 2)`` for the
sigmoid, ``1 + hardtanh(z / 3)`` for the hard sigmoid. It is computed as ``addcmul(x, x,
centred(z))``, ``x + x * centred(z)``: at ``z = 0`` that is ``x + x * 0 = x`` bit for bit in every
floating point format (signed zeros included; only an infinite activation would become NaN), so a
block whose last layer is zero returns its input exactly. That form also keeps for backward just
``x`` and ``centred(z)``, the two tensors timm's ``x * gate(z)`` keeps; ``x * (2 * gate(z))`` kept
one (B, C, 1, 1) factor more per block.

Autograd's backward of that ``addcmul`` is costly, though: it treats the two ``x`` as two inputs
(one gradient ``grad``, one ``grad * centred(z)``, then summed: two extra passes over the map) and
reduces ``grad * x * 1`` for the factor. Where a gradient is wanted, the gate is therefore a
:class:`GainTwoGate` autograd function: the same ``addcmul`` forward (bitwise the same output),
and the backward timm's ``x * gate(z)`` gets, ``grad + grad * centred(z)`` (one addcmul) for ``x`` and
``sum(grad * x)`` for the factor, over the map once each. It saves ``x`` and ``z`` (z is the size
of timm's saved ``gate(z)``; the small factor is recomputed in backward), so memory is timm's too.
The backward is made of differentiable ops on the saved inputs, so double backward works. Without a
gradient (inference) and while tracing, scripting, exporting or compiling, the plain ``addcmul``
runs: the exported and traced graphs are unchanged. timm's NFNet uses the same gain-2 gate
(``attn_gain=2.0``). ``gain = 1`` is the papers' plain gate, ``x * gate(z)``. MobileNetV3 uses the
hard sigmoid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import AttnInjectError

INITS = {"identity": 2.0, "paper": 1.0}  # init name -> gate gain
GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"sigmoid": torch.sigmoid, "hard_sigmoid": F.hardsigmoid}


@dataclass(frozen=True)
class Centred:
    """``2 * gate(z) - 1`` and its derivative: ``backward(grad, z, value)`` is ``grad * d value / dz``."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# gate -> its centred form (the one the gain-2 gate is computed with), each written as autograd
# would differentiate it (tanh_backward on tanh's output, hardtanh_backward on its input)
CENTRED: dict[Callable, Centred] = {
    torch.sigmoid: Centred(
        lambda z: torch.tanh(z * 0.5), lambda grad, z, t: torch.ops.aten.tanh_backward(grad, t) * 0.5
    ),
    F.hardsigmoid: Centred(
        lambda z: F.hardtanh(z / 3), lambda grad, z, t: torch.ops.aten.hardtanh_backward(grad, z / 3, -1.0, 1.0) / 3
    ),
}


def gate_gain(init: str) -> float:
    """The gate gain for an ``init`` name, checked."""
    if init not in INITS:
        raise AttnInjectError(f"unknown init {init!r}", hint=f"Valid inits: {', '.join(INITS)}.")
    return INITS[init]


def gate_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gate function for a ``gate`` option name, checked."""
    if name not in GATES:
        raise AttnInjectError(f"unknown gate {name!r}", hint=f"Valid gates: {', '.join(GATES)}.")
    return GATES[name]


def apply_gate(x: torch.Tensor, z: torch.Tensor, gain: float, gate: Callable = torch.sigmoid) -> torch.Tensor:
    """Scale ``x`` by ``gain * gate(z)``: gain 2 as ``x + x * centred(z)`` (exact at z = 0), else plainly."""
    if gain == 2.0:
        centred = CENTRED[gate]
        if _wants_gradient(x, z):
            return GainTwoGate.apply(x, z, centred)
        return torch.addcmul(x, x, centred.forward(z))
    return x * gate(z) if gain == 1.0 else x * (gate(z) * gain)


def _wants_gradient(x: Any, z: Any) -> bool:
    """Eager autograd on real tensors: not under a tracer, exporter or compiler, which see the plain ops."""
    if not (isinstance(x, torch.Tensor) and isinstance(z, torch.Tensor) and torch.is_grad_enabled()):
        return False
    if not (x.requires_grad or z.requires_grad):
        return False
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())


class GainTwoGate(torch.autograd.Function):
    """``x * (1 + centred(z))`` computed as ``addcmul(x, x, centred(z))``, with timm's backward cost."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, z: torch.Tensor, centred: Centred) -> torch.Tensor:
        ctx.centred = centred
        ctx.save_for_backward(x, z)
        return torch.addcmul(x, x, centred.forward(z))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, z = ctx.saved_tensors
        centred: Centred = ctx.centred
        t = centred.forward(z)
        grad_x = torch.addcmul(grad, grad, t).sum_to_size(x.shape) if ctx.needs_input_grad[0] else None
        grad_z = None
        if ctx.needs_input_grad[1]:
            grad_t = (grad * x).sum_to_size(t.shape)
            grad_z = centred.backward(grad_t, z, t).sum_to_size(z.shape)
        return grad_x, grad_z, None
