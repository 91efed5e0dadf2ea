"""Efficient Channel Attention (Wang, Wu, Zhu, Li, Zuo, Hu; arXiv 1910.03151).

    s = gate(Conv1d_k(GAP(x))),  y = x ⊙ s

A 1-D convolution without bias slides over the pooled channel vector, so each channel's weight
depends on its k neighbours and no dimensionality reduction happens. The kernel size adapts to
the channel count C:

    k = | log2(C) / gamma + b / gamma |_odd,   gamma = 2, b = 1

implemented as ``k = int(abs((log2(C) + b) / gamma)); k += 1 - k % 2`` (an even value goes up to
the next odd one). C = 64, 128, 256, 512, 1024, 2048 give k = 3, 5, 5, 5, 5, 7.

``kernel_size`` overrides the adaptive k: an odd int, or steps ``[[min_channels, k], ...]`` that
pick k from the site's channels (the largest ``min_channels`` not above C). The ECA authors'
``eca_mobilenetv2.py`` uses ``[[1, 1], [96, 3]]``: k = 1 below 96 channels, 3 from 96 up.
``None`` or ``"adaptive"`` is the paper's rule above.

``init="identity"`` zeroes the conv weight and uses a gain-2 gate, so the block is the identity
when inserted; ``init="paper"`` keeps PyTorch's default init and the plain sigmoid gate.

``spatial_dims`` (1, 2 or 3) only says which maps it serves: it pools over every spatial axis,
and its Conv1d over the channels is the same at every dimension (so are its parameters).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import AttnInjectError
from .gate import apply_gate, gate_gain
from .registry import register_block
from .spatial import conv_of_dims, pooled_shape, spatial_axes


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive kernel size: the odd integer at ``|(log2(C) + b) / gamma|``."""
    k = int(abs((math.log2(channels) + beta) / gamma))
    return k + 1 - k % 2


KernelSize = int | str | None | tuple[tuple[int, int], ...]


def resolve_kernel_size(channels: int, kernel_size: KernelSize, gamma: float = 2, beta: float = 1) -> int:
    """The kernel size at ``channels``: adaptive (None / "adaptive"), fixed (an int), or by steps."""
    if kernel_size is None or kernel_size == "adaptive":
        return eca_kernel_size(channels, gamma, beta)
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        k = kernel_size
    elif isinstance(kernel_size, (list, tuple)) and kernel_size and all(_is_step(s) for s in kernel_size):
        chosen = [k for low, k in sorted(kernel_size) if low <= channels]
        if not chosen:
            raise AttnInjectError(
                f"ECA kernel_size steps {_plain(kernel_size)} give no k for {channels} channels",
                hint="Start the steps at 1 channel, e.g. [[1, 1], [96, 3]].",
            )
        k = chosen[-1]
    else:
        raise AttnInjectError(
            f"ECA kernel_size must be an odd int, 'adaptive', or steps [[min_channels, k], ...]; got {kernel_size!r}"
        )
    if k < 1 or k % 2 == 0:
        at = "" if isinstance(kernel_size, int) else f" for {channels} channels (from the steps {_plain(kernel_size)})"
        raise AttnInjectError(f"ECA needs an odd kernel_size >= 1; got kernel_size={k}{at}")
    return k


def _is_step(step) -> bool:
    return (
        isinstance(step, (list, tuple))
        and len(step) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in step)
    )


def _plain(steps) -> list:
    return [list(s) for s in steps]


@register_block("eca", gate="conv", fresh_output=True)
class EfficientChannelAttention(nn.Module):
    def __init__(
        self,
        channels: int,
        gamma: float = 2,
        beta: float = 1,
        kernel_size: KernelSize = None,
        spatial_dims: int = 2,
        init: str = "identity",
    ):
        super().__init__()
        conv_of_dims(spatial_dims, "ECA")  # checks the dims
        if gamma <= 0:
            raise AttnInjectError(f"ECA needs gamma > 0; got gamma={gamma}")
        self.gain = gate_gain(init)
        self.init = init
        k = resolve_kernel_size(channels, kernel_size, gamma, beta)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        if init == "identity":
            nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean(spatial_axes(x)).unsqueeze(1))  # (B, 1, C): convolve along the channels
        return apply_gate(x, pooled_shape(y.transpose(1, 2), x), self.gain)  # (B, C, 1, ...)

    def extra_repr(self) -> str:
        return f"init={self.init!r}"
