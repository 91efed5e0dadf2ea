"""Pieces the blocks share: N-D norms by ``spatial_dims``, activations, reduced widths, the zero init.

A block that takes ``spatial_dims: int = 2`` (1, 2 or 3) builds its layers with ``spatial.CONVS`` and
``BATCH_NORMS`` and pools over ``spatial.spatial_axes(x)``, so it runs on ``[N, C, *S]`` maps of that many
spatial dims and never assumes a 4-D input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import make_divisible
from torch import nn

from ..errors import AttnInjectError
from .se import ACTIVATIONS as SE_ACTIVATIONS

BATCH_NORMS: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
ACTIVATIONS: dict[str, type[nn.Module]] = {**SE_ACTIVATIONS, "hard_swish": nn.Hardswish}


def check_spatial_dims(block: str, spatial_dims: int, supported: tuple[int, ...] = (1, 2, 3)) -> int:
    """``spatial_dims`` if the block supports it; otherwise one error naming the block and the dims."""
    if spatial_dims not in supported:
        raise AttnInjectError(
            f"{block} works on maps with {' or '.join(map(str, supported))} spatial dims, not {spatial_dims!r}",
            hint="Pick another block for this site, or leave it out with exclude=.",
        )
    return spatial_dims


def activation(block: str, name: str, inplace: bool = True) -> nn.Module:
    """The activation module for an ``act`` option name, checked."""
    if name not in ACTIVATIONS:
        raise AttnInjectError(f"unknown {block} act {name!r}", hint=f"Valid activations: {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name](inplace=inplace)


def reduced_width(block: str, channels: int, rd_ratio: float, rd_channels: int | None, rd_divisor: int) -> int:
    """timm's reduced width: ``rd_channels``, else ``channels * rd_ratio`` rounded to ``rd_divisor``."""
    if rd_ratio <= 0 or rd_divisor < 1 or (rd_channels is not None and rd_channels < 1):
        raise AttnInjectError(
            f"{block} needs rd_ratio > 0, rd_divisor >= 1 and rd_channels >= 1; "
            f"got rd_ratio={rd_ratio}, rd_divisor={rd_divisor}, rd_channels={rd_channels}"
        )
    return rd_channels or make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an ``[N, C, *S]`` map (timm's ``LayerNorm2d`` for any dims)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)


def zero_(*layers: nn.Module) -> None:
    """Set every parameter of ``layers`` to zero (a block's last layer at the identity init)."""
    for layer in layers:
        for p in layer.parameters(recurse=False):
            nn.init.zeros_(p)
