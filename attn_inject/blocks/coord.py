"""Coordinate attention (Hou, Zhou, Feng; CVPR 2021, arXiv 2103.02907).

    z_h = AvgPool_W(x),  z_w = AvgPool_H(x)                       (N, C, H, 1), (N, C, 1, W)
    f = act(BN(Conv1x1([z_h, z_w^T])))                            shared: C -> mip, along H + W
    s_h = gate(Conv_h(f_h)),  s_w = gate(Conv_w(f_w^T)),  y = x ⊙ s_h ⊙ s_w

As the authors' code (github.com/Andrew-Qibin/CoordAttention, ``coordatt.py``): the shared width
is ``mip = max(min_mip, channels // reduction)`` with ``reduction=32``, ``min_mip=8``, convs with
bias, a BatchNorm and h-swish (``act="hard_swish"``). ``rd_ratio`` (with ``rd_divisor``) gives
timm's width rule instead (timm's ``CoordAttn``: ``rd_ratio = 1/16 * 2/3``, ``rd_divisor=8``,
``bias=False``).

``init="identity"`` zeroes ``conv_h`` and ``conv_w`` (weight and bias) and uses gain-2 gates: both
factors are exactly 1 and the block returns ``x`` bit for bit; both convs get a gradient at step 0.
``init="paper"`` keeps PyTorch's default init and plain sigmoid gates. The block pools along the
two axes of a 2-D map: ``spatial_dims`` other than 2 are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AttnInjectError
from .gate import apply_gate, gate_gain
from .parts import activation, check_spatial_dims, reduced_width, zero_
from .registry import register_block


@register_block("coord", gate=("conv_h", "conv_w"), fresh_output=True)
class CoordAttention(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: int = 32,
        min_mip: int = 8,
        rd_ratio: float | None = None,
        rd_divisor: int = 8,
        bias: bool = True,
        act: str = "hard_swish",
        spatial_dims: int = 2,
        init: str = "identity",
    ):
        super().__init__()
        check_spatial_dims("coordinate attention (H and W axes)", spatial_dims, (2,))
        if reduction < 1 or min_mip < 1:
            raise AttnInjectError(
                f"coordinate attention needs reduction >= 1 and min_mip >= 1; got {reduction}, {min_mip}"
            )
        self.gain = gate_gain(init)
        self.init = init
        if rd_ratio is None:
            mip = max(min_mip, channels // reduction)
        else:
            mip = reduced_width("coordinate attention", channels, rd_ratio, None, rd_divisor)
        self.conv1 = nn.Conv2d(channels, mip, kernel_size=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = activation("coordinate attention", act)
        self.conv_h = nn.Conv2d(mip, channels, kernel_size=1, bias=bias)
        self.conv_w = nn.Conv2d(mip, channels, kernel_size=1, bias=bias)
        if init == "identity":
            zero_(self.conv_h, self.conv_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)
        f_h, f_w = torch.split(self.act(self.bn1(self.conv1(pooled))), [h, w], dim=2)
        y = apply_gate(x, self.conv_w(f_w).transpose(2, 3), self.gain)
        return apply_gate(y, self.conv_h(f_h), self.gain)

    def extra_repr(self) -> str:
        return f"init={self.init!r}"
