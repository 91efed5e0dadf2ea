"""SimAM, a parameter-free attention module (Yang, Zhang, Li, Xie; ICML 2021).

    d = (x - mean_S(x))^2,   v = sum_S(d) / (n - 1),   e = d / (4 (v + e_lambda)) + 0.5
    y = x ⊙ sigmoid(e)                                   (n: the spatial size of the map)

Each neuron's weight comes from an energy function: the more it stands out from its channel's
mean, the larger. ``e_lambda`` is the paper's 1e-4. A 1x1 map (n = 1) divides by 1 instead of 0
(the paper's code gives NaN there).

SimAM has no parameters, so nothing can make it the identity at init: it is registered with
``identity="gate"`` and comes through the gated wrapper, ``y = x + alpha * (SimAM(x) - x)`` with a
learned scalar ``alpha = 0`` (gated.py): ``x`` in value at insertion, and ``alpha`` learns how much
SimAM to use. ``init="paper"`` is SimAM alone. ``spatial_dims`` 1, 2 or 3: the statistics are
taken over all spatial axes of the map.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import AttnInjectError
from .parts import check_spatial_dims
from .registry import register_block
from .spatial import spatial_axes


@register_block("simam", fresh_output=True, identity="gate")
class SimAM(nn.Module):
    def __init__(self, channels: int, e_lambda: float = 1e-4, spatial_dims: int = 2):
        super().__init__()
        check_spatial_dims("SimAM", spatial_dims)
        if e_lambda <= 0:
            raise AttnInjectError(f"SimAM needs e_lambda > 0; got {e_lambda}")
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = spatial_axes(x)
        n = max(math.prod(x.shape[2:]) - 1, 1)
        d = (x - x.mean(axes, keepdim=True)).pow(2)
        e = d / (4 * (d.sum(axes, keepdim=True) / n + self.e_lambda)) + 0.5
        return x * torch.sigmoid(e)

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"
