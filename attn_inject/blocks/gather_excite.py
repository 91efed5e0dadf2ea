"""Gather-excite (Hu, Shen, Albanie, Sun, Vedaldi; NeurIPS 2018, arXiv 1810.12348).

    gather:  g = pool over windows of the map's extent (θ⁻: average pooling, no parameters;
             θ: strided depthwise 3x3 convs + norms, log2(extent) of them; extent 0 = global)
    excite:  y = x ⊙ gate(interpolate(mlp(g)))    (the mlp, 1x1 convs C -> C * rd_ratio -> C, is
             the paper's "+" variant, timm's ``use_mlp=True``)

Options as timm's ``GatherExcite``: ``extent``, ``extra_params`` (θ), ``use_mlp``, ``rd_ratio=1/16``,
``rd_divisor=1``, ``add_maxpool``. timm's attention name "ge" is ``extent=0, extra_params=False,
use_mlp=True``. A global extent with parameters needs a kernel of the map's size, which a block
built from channels alone does not know: refused.

Identity: with the mlp, ``init="identity"`` zeroes ``mlp.fc2`` (weight and bias) and uses a gain-2
gate; θ without the mlp zeroes the gather's last norm instead; both are ``x`` bit for bit and those
layers get a gradient at step 0. θ⁻ without the mlp has no parameter to zero: it comes through the
gated wrapper ``y = x + alpha * (f(x) - x)``, ``alpha = 0`` (gated.py; ``x`` in value, and only
``alpha`` learns at step 0). ``init="paper"`` keeps PyTorch's default init, the plain sigmoid gate
and no ``alpha``. ``spatial_dims`` 1, 2 or 3 builds N-D pools and convs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnInjectError
from .gate import apply_gate, gate_gain
from .gated import gated_residual
from .parts import BATCH_NORMS, activation, check_spatial_dims, reduced_width, zero_
from .registry import register_block
from .spatial import CONVS, spatial_axes

_AVG_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class ExciteMlp(nn.Module):
    """The "+" variant's 1x1 convs on the gathered map (timm's ``ConvMlp`` layout)."""

    def __init__(self, channels: int, rd: int, act: str, spatial_dims: int):
        super().__init__()
        conv = CONVS[spatial_dims]
        self.fc1 = conv(channels, rd, kernel_size=1)
        self.act = activation("gather-excite", act)
        self.fc2 = conv(rd, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _gather_convs(channels: int, extent: int, act: str, spatial_dims: int) -> nn.Sequential:
    """θ: log2(extent) strided depthwise 3x3 convs, each with a norm, acts between."""
    gather = nn.Sequential()
    count = int(math.log2(extent))
    for i in range(1, count + 1):
        gather.add_module(
            f"conv{i}",
            CONVS[spatial_dims](channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
        )
        gather.add_module(f"norm{i}", BATCH_NORMS[spatial_dims](channels))
        if i < count:
            gather.add_module(f"act{i}", activation("gather-excite", act))
    return gather


@register_block("ge", gate=("mlp.fc2", "gather.-1", "alpha"), fresh_output=True)
class GatherExcite(nn.Module):
    def __init__(
        self,
        channels: int,
        extent: int = 0,
        extra_params: bool = False,
        use_mlp: bool = True,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        add_maxpool: bool = False,
        act: str = "relu",
        spatial_dims: int = 2,
        init: str = "identity",
    ):
        super().__init__()
        self.spatial_dims = check_spatial_dims("gather-excite", spatial_dims)
        if extent < 0 or (extent and (extent & (extent - 1) or extent < 2)):
            raise AttnInjectError(f"gather-excite needs extent 0 (global) or a power of 2 >= 2; got {extent}")
        if extra_params and extent == 0:
            raise AttnInjectError(
                "gather-excite with extra_params and a global extent needs the map's size, unknown to a block",
                hint="Use extent=2, 4, 8... with extra_params, or extra_params=False.",
            )
        self.gain = gate_gain(init)
        self.init, self.extent, self.add_maxpool = init, extent, add_maxpool
        self.gather = _gather_convs(channels, extent, act, spatial_dims) if extra_params else None
        self.mlp = None
        if use_mlp:
            rd = reduced_width("gather-excite", channels, rd_ratio, rd_channels, rd_divisor)
            self.mlp = ExciteMlp(channels, rd, act, spatial_dims)
        # θ⁻ without the mlp: nothing to zero, so the gated wrapper's alpha (plain gate inside)
        gated = self.mlp is None and self.gather is None and init == "identity"
        self.alpha = nn.Parameter(torch.zeros(())) if gated else None
        if gated:
            self.gain = 1.0
        if init == "identity" and self.mlp is not None:
            zero_(self.mlp.fc2)
        elif init == "identity" and self.gather is not None:
            zero_(self.gather[-1])

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather is not None:
            return self.gather(x)
        if self.extent == 0:
            g = x.mean(spatial_axes(x), keepdim=True)
            return 0.5 * g + 0.5 * x.amax(spatial_axes(x), keepdim=True) if self.add_maxpool else g
        k, pad = 2 * self.extent - 1, self.extent - 1
        g = _AVG_POOLS[self.spatial_dims](x, k, self.extent, pad, count_include_pad=False)
        if self.add_maxpool:
            g = 0.5 * g + 0.5 * _MAX_POOLS[self.spatial_dims](x, k, self.extent, pad)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self._gathered(x)
        if self.mlp is not None:
            z = self.mlp(z)
        if any(s != 1 for s in z.shape[2:]):
            z = F.interpolate(z, size=x.shape[2:])
        y = apply_gate(x, z, self.gain)
        return y if self.alpha is None else gated_residual(x, y, self.alpha)

    def extra_repr(self) -> str:
        return f"extent={self.extent}, init={self.init!r}"
