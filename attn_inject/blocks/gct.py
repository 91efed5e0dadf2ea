"""Gated Channel Transformation (Yang, Zhu, Wu, Yang; CVPR 2020, arXiv 1909.11519).

    s = alpha ⊙ ||x_c||_2                      embedding: the l2 norm of each channel (or l1)
    n = gamma ⊙ s / sqrt(mean_c(s^2) + eps)    channel normalisation
    y = x ⊙ (1 + tanh(n + beta))

Three vectors of C values: ``alpha`` (embedding weight, 1 at init), ``gamma`` and ``beta`` (gating
weight and bias, 0 at init), as the authors' code (github.com/z-x-yang/GCT). ``mode`` is "l2" (the
paper's default) or "l1" (``after_relu`` skips the absolute value on a non-negative map); ``epsilon``
is the paper's 1e-5.

The paper's own init is the identity: with ``gamma = beta = 0`` the factor is ``1 + tanh(0) = 1``,
computed as ``x + x * tanh(0)`` so the block returns ``x`` bit for bit; ``init="identity"`` and
``init="paper"`` build the same block. ``beta`` and ``gamma`` get a gradient at step 0 (``alpha``
once ``gamma`` moves). The embedding and the normalisation are computed in float32 (the sum of
squares of a half-precision map overflows easily) and the factor cast back to the map's dtype.
``spatial_dims`` 1, 2 or 3 sets the shape of the three vectors and the axes of the norm.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AttnInjectError
from .gate import gate_gain
from .parts import check_spatial_dims
from .registry import register_block
from .spatial import spatial_axes

MODES = ("l2", "l1")


@register_block("gct", gate=("gamma", "beta"), fresh_output=True)
class GatedChannelTransformation(nn.Module):
    def __init__(
        self,
        channels: int,
        epsilon: float = 1e-5,
        mode: str = "l2",
        after_relu: bool = False,
        spatial_dims: int = 2,
        init: str = "identity",
    ):
        super().__init__()
        check_spatial_dims("GCT", spatial_dims)
        if mode not in MODES:
            raise AttnInjectError(f"unknown GCT mode {mode!r}", hint=f"Valid modes: {', '.join(MODES)}.")
        if epsilon <= 0:
            raise AttnInjectError(f"GCT needs epsilon > 0; got {epsilon}")
        gate_gain(init)  # checks the name: both inits are the paper's, the identity
        self.init, self.mode, self.epsilon, self.after_relu = init, mode, epsilon, after_relu
        shape = (1, channels) + (1,) * spatial_dims
        self.alpha = nn.Parameter(torch.ones(shape))
        self.gamma = nn.Parameter(torch.zeros(shape))
        self.beta = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf, axes = x.float(), spatial_axes(x)
        alpha, gamma, beta = self.alpha.float(), self.gamma.float(), self.beta.float()
        if self.mode == "l2":
            embedding = (xf.pow(2).sum(axes, keepdim=True) + self.epsilon).sqrt() * alpha
            norm = gamma / (embedding.pow(2).mean(1, keepdim=True) + self.epsilon).sqrt()
        else:
            embedding = (xf if self.after_relu else xf.abs()).sum(axes, keepdim=True) * alpha
            norm = gamma / (embedding.abs().mean(1, keepdim=True) + self.epsilon)
        return torch.addcmul(x, x, torch.tanh(embedding * norm + beta).to(x.dtype))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, init={self.init!r}"
