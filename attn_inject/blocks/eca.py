"""Efficient Channel Attention (Wang, Wu, Zhu, Li, Zuo, Hu; arXiv 1910.03151).

    s = gate(Conv1d_k(GAP(x))),  y = x ⊙ s

A 1-D convolution without bias slides over the pooled channel vector, so each channel's weight
depends on its k neighbours and no dimensionality reduction happens. The kernel size adapts to
the channel count C:

    k = | log2(C) / gamma + b / gamma |_odd,   gamma = 2, b = 1

implemented as ``k = int(abs((log2(C) + b) / gamma)); k += 1 - k % 2`` (an even value goes up to
the next odd one). C = 64, 128, 256, 512, 1024, 2048 give k = 3, 5, 5, 5, 5, 7.

``init="identity"`` zeroes the conv weight and uses a gain-2 gate, so the block is the identity
when inserted; ``init="paper"`` keeps PyTorch's default init and the plain sigmoid gate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import AttnInjectError
from .gate import apply_gate, gate_gain
from .registry import register_block


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive kernel size: the odd integer at ``|(log2(C) + b) / gamma|``."""
    k = int(abs((math.log2(channels) + beta) / gamma))
    return k + 1 - k % 2


@register_block("eca", fresh_output=True)
class EfficientChannelAttention(nn.Module):
    def __init__(
        self,
        channels: int,
        gamma: float = 2,
        beta: float = 1,
        kernel_size: int | None = None,
        init: str = "identity",
    ):
        super().__init__()
        if gamma <= 0 or (kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0)):
            raise AttnInjectError(
                f"ECA needs gamma > 0 and an odd kernel_size >= 1; got gamma={gamma}, kernel_size={kernel_size}"
            )
        self.gain = gate_gain(init)
        self.init = init
        k = kernel_size or eca_kernel_size(channels, gamma, beta)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        if init == "identity":
            nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean((2, 3)).unsqueeze(1))  # (B, 1, C): convolve along the channels
        return apply_gate(x, y.transpose(1, 2).unsqueeze(-1), self.gain)  # (B, C, 1, 1)

    def extra_repr(self) -> str:
        return f"init={self.init!r}"
