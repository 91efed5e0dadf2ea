"""The gate shared by the blocks: ``x * gain * gate(z)``, gate a sigmoid or a hard sigmoid.

With ``gain = 2`` and ``z = 0`` the factor is ``2 * gate(0) = 1.0`` exactly in every floating
point format (``sigmoid(0)`` and ``hard_sigmoid(0) = relu6(3) / 6`` are both exactly 0.5), so a
block whose last layer is zero returns its input bit for bit. timm's NFNet uses the same gain-2
gate (``attn_gain=2.0``). ``gain = 1`` is the papers' plain gate. MobileNetV3 uses the hard sigmoid.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import AttnInjectError

INITS = {"identity": 2.0, "paper": 1.0}  # init name -> gate gain
GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"sigmoid": torch.sigmoid, "hard_sigmoid": F.hardsigmoid}


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
    """Scale ``x`` by ``gain * gate(z)``; the factor is formed first so ``gain * 0.5`` is exact."""
    return x * (gate(z) * gain)
