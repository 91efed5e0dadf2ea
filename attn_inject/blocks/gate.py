"""The gate shared by the blocks: ``x * gain * gate(z)``, gate a sigmoid or a hard sigmoid.

With ``gain = 2`` the factor is ``2 * gate(z) = 1 + centred(z)``: ``1 + tanh(z / 2)`` for the
sigmoid, ``1 + hardtanh(z / 3)`` for the hard sigmoid. It is computed as ``addcmul(x, x,
centred(z))``, ``x + x * centred(z)``: at ``z = 0`` that is ``x + x * 0 = x`` bit for bit in every
floating point format (signed zeros included; only an infinite activation would become NaN), so a
block whose last layer is zero returns its input exactly. That form also keeps for backward just
``x`` and ``centred(z)``, the two tensors timm's ``x * gate(z)`` keeps; ``x * (2 * gate(z))`` kept
one (B, C, 1, 1) factor more per block. timm's NFNet uses the same gain-2 gate
(``attn_gain=2.0``). ``gain = 1`` is the papers' plain gate, ``x * gate(z)``. MobileNetV3 uses the
hard sigmoid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import AttnInjectError

INITS = {"identity": 2.0, "paper": 1.0}  # init name -> gate gain
GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"sigmoid": torch.sigmoid, "hard_sigmoid": F.hardsigmoid}
# gate -> 2 * gate(z) - 1, the centred form the gain-2 gate is computed with
_CENTRED: dict[Callable, Callable[[torch.Tensor], torch.Tensor]] = {
    torch.sigmoid: lambda z: torch.tanh(z * 0.5),
    F.hardsigmoid: lambda z: F.hardtanh(z / 3),
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
        return torch.addcmul(x, x, _CENTRED[gate](z))
    return x * gate(z) if gain == 1.0 else x * (gate(z) * gain)
