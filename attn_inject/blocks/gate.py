"""The gate shared by the blocks: ``x * gain * sigmoid(z)``.

With ``gain = 2`` and ``z = 0`` the factor is ``2 * sigmoid(0) = 1.0`` exactly in every floating
point format, so a block whose last layer is zero returns its input bit for bit. timm's NFNet uses
the same gain-2 gate (``attn_gain=2.0``). ``gain = 1`` is the papers' plain sigmoid gate.
"""

from __future__ import annotations

import torch

from ..errors import AttnInjectError

INITS = {"identity": 2.0, "paper": 1.0}  # init name -> gate gain


def gate_gain(init: str) -> float:
    """The gate gain for an ``init`` name, checked."""
    if init not in INITS:
        raise AttnInjectError(f"unknown init {init!r}", hint=f"Valid inits: {', '.join(INITS)}.")
    return INITS[init]


def apply_gate(x: torch.Tensor, z: torch.Tensor, gain: float) -> torch.Tensor:
    """Scale ``x`` by ``gain * sigmoid(z)``; the factor is formed first so ``gain * 0.5`` is exact."""
    return x * (z.sigmoid() * gain)
