"""CBAM, the Convolutional Block Attention Module (Woo, Park, Lee, Kweon; ECCV 2018, arXiv 1807.06521).

    channel gate:  s_c = gate(MLP(AvgPool(x)) + MLP(MaxPool(x))),        x' = x ⊙ s_c
    spatial gate:  s_s = gate(BN(Conv_kxk([mean_c(x'), max_c(x')]))),   y = x' ⊙ s_s

The MLP is a shared pair of 1x1 convs without bias (C -> C * rd_ratio -> C, ReLU between), the
spatial conv maps the two channel-wise pools to one map (k = ``spatial_kernel_size``, 7 in the
paper) and is followed by a BatchNorm, as in the paper's code and timm's ``CbamModule``; options and
parameter count match timm's (``rd_ratio=1/16``, ``rd_divisor=1``, ``mlp_bias=False``).

``init="identity"`` zeroes the channel MLP's ``fc2`` and the spatial gate's norm (weight and bias)
and uses gain-2 gates: both gates are exactly 1, so the block returns ``1 * 1 * x`` bit for bit;
``fc2`` and the norm get a gradient at step 0. ``init="paper"`` keeps PyTorch's default init and
plain sigmoid gates. ``spatial_dims`` 1, 2 or 3 builds N-D pools, conv and norm.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AttnInjectError
from .gate import apply_gate, gate_gain
from .parts import BATCH_NORMS, activation, check_spatial_dims, reduced_width, zero_
from .registry import register_block
from .spatial import CONVS, spatial_axes


class ChannelGate(nn.Module):
    """CBAM's channel half: one MLP on the average- and the max-pooled map, summed."""

    def __init__(self, channels: int, rd: int, act: str, bias: bool, spatial_dims: int, gain: float):
        super().__init__()
        conv = CONVS[spatial_dims]
        self.fc1 = conv(channels, rd, kernel_size=1, bias=bias)
        self.act = activation("CBAM", act)
        self.fc2 = conv(rd, channels, kernel_size=1, bias=bias)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = spatial_axes(x)
        z_avg = self.fc2(self.act(self.fc1(x.mean(axes, keepdim=True))))
        z_max = self.fc2(self.act(self.fc1(x.amax(axes, keepdim=True))))
        return apply_gate(x, z_avg + z_max, self.gain)


class SpatialGate(nn.Module):
    """CBAM's spatial half: a kxk conv and a norm on the channel-wise mean and max."""

    def __init__(self, kernel_size: int, spatial_dims: int, gain: float):
        super().__init__()
        self.conv = CONVS[spatial_dims](2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = BATCH_NORMS[spatial_dims](1)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return apply_gate(x, self.norm(self.conv(pooled)), self.gain)


@register_block("cbam", gate=("channel.fc2", "spatial.norm"), fresh_output=True)
class CBAM(nn.Module):
    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        spatial_kernel_size: int = 7,
        act: str = "relu",
        mlp_bias: bool = False,
        spatial_dims: int = 2,
        init: str = "identity",
    ):
        super().__init__()
        check_spatial_dims("CBAM", spatial_dims)
        if spatial_kernel_size < 1 or spatial_kernel_size % 2 == 0:
            raise AttnInjectError(f"CBAM needs an odd spatial_kernel_size >= 1; got {spatial_kernel_size}")
        gain = gate_gain(init)
        self.init = init
        rd = reduced_width("CBAM", channels, rd_ratio, rd_channels, rd_divisor)
        self.channel = ChannelGate(channels, rd, act, mlp_bias, spatial_dims, gain)
        self.spatial = SpatialGate(spatial_kernel_size, spatial_dims, gain)
        if init == "identity":
            zero_(self.channel.fc2, self.spatial.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))

    def extra_repr(self) -> str:
        return f"init={self.init!r}"
