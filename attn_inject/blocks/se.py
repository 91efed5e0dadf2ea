"""Squeeze-and-Excitation (Hu, Shen, Albanie, Sun, Wu; arXiv 1709.01507).

    s = gate(W2 · ReLU(W1 · GAP(x))),  y = x ⊙ s

``W1`` reduces C channels to C/r, ``W2`` restores C. The FC layers are 1x1 convolutions on the
pooled map (the same maths, and the layout and submodule names ``fc1``/``fc2`` of timm's
``SEModule``). The reduced width is ``C / reduction`` rounded to a
multiple of ``rd_divisor`` and at least ``rd_divisor`` (timm's ``make_divisible``).

``init="identity"`` zeroes ``fc2`` (weight and bias) and uses a gain-2 gate: the block is the
identity when inserted and its Jacobian is the identity, so fine-tuning starts from the original
model; ``fc2`` still receives a gradient at step 0. ``init="paper"`` keeps PyTorch's default init
and the plain sigmoid gate.
"""

from __future__ import annotations

import torch
from timm.layers import make_divisible
from torch import nn

from ..errors import AttnInjectError
from .gate import apply_gate, gate_gain
from .registry import register_block


@register_block("se", fresh_output=True)
class SqueezeExcite(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        init: str = "identity",
    ):
        super().__init__()
        if reduction <= 0 or rd_divisor < 1 or (rd_channels is not None and rd_channels < 1):
            raise AttnInjectError(
                f"SE needs reduction > 0, rd_divisor >= 1 and rd_channels >= 1; got reduction={reduction}, "
                f"rd_divisor={rd_divisor}, rd_channels={rd_channels}"
            )
        self.gain = gate_gain(init)
        self.init = init
        rd = rd_channels or make_divisible(channels / reduction, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, kernel_size=1, bias=True)
        if init == "identity":
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return apply_gate(x, z, self.gain)

    def extra_repr(self) -> str:
        return f"init={self.init!r}"
