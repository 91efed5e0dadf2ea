"""Global context block (GCNet: Cao, Xu, Lin, Wei, Hu; ICCV workshops 2019, arXiv 1904.11492).

    context = sum_j softmax_j(W_k x_j) x_j                     attention pooling (or the mean)
    t = Conv1x1(act(LN(Conv1x1(context))))                      bottleneck transform, C -> C * rd_ratio -> C
    y = x + t  (fuse_add)   and/or   y = x ⊙ gate(t)  (fuse_scale)

Options and layout as timm's ``GlobalContext`` (``conv_attn``, ``mlp_add`` / ``mlp_scale`` each
``fc1``/``norm``/``act``/``fc2``, a channel LayerNorm with eps 1e-6, ``rd_ratio=1/8``): timm's
attention name "gc" is the scale fusion, "gca" (GCNet's own, used by ``gcresnet33ts``) the add.
``use_attn=False`` pools by the mean instead.

``init="identity"`` zeroes the last conv of each transform (weight and bias): the add fusion adds
``+0`` (``x`` in value; a negative zero input may come back positive), the scale fusion uses a
gain-2 gate and is ``x`` bit for bit; those convs get a gradient at step 0. ``init="paper"`` is
GCNet's: ``conv_attn`` Kaiming-normal (fan in), the add transform's last conv zero, PyTorch's
default elsewhere, the plain sigmoid gate. ``spatial_dims`` 1, 2 or 3 builds N-D convs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AttnInjectError
from .gate import apply_gate, gate_gain
from .parts import ChannelLayerNorm, activation, check_spatial_dims, reduced_width, zero_
from .registry import register_block
from .spatial import CONVS


class ContextMlp(nn.Module):
    """The bottleneck transform on the pooled context: 1x1 conv, channel LayerNorm, act, 1x1 conv."""

    def __init__(self, channels: int, rd: int, act: str, spatial_dims: int):
        super().__init__()
        conv = CONVS[spatial_dims]
        self.fc1 = conv(channels, rd, kernel_size=1)
        self.norm = ChannelLayerNorm(rd)
        self.act = activation("global context", act, inplace=False)  # as timm's: its output's layout picks fc2's kernel
        self.fc2 = conv(rd, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


@register_block("gc", gate=("mlp_scale.fc2", "mlp_add.fc2"), fresh_output=True)
class GlobalContext(nn.Module):
    def __init__(
        self,
        channels: int,
        use_attn: bool = True,
        fuse_add: bool = False,
        fuse_scale: bool = True,
        rd_ratio: float = 1 / 8,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        act: str = "relu",
        spatial_dims: int = 2,
        init: str = "identity",
    ):
        super().__init__()
        check_spatial_dims("global context", spatial_dims)
        if not (fuse_add or fuse_scale):
            raise AttnInjectError("global context needs fuse_add or fuse_scale (or both)")
        self.gain = gate_gain(init)
        self.init = init
        rd = reduced_width("global context", channels, rd_ratio, rd_channels, rd_divisor)
        self.conv_attn = CONVS[spatial_dims](channels, 1, kernel_size=1) if use_attn else None
        self.mlp_add = ContextMlp(channels, rd, act, spatial_dims) if fuse_add else None
        self.mlp_scale = ContextMlp(channels, rd, act, spatial_dims) if fuse_scale else None
        if self.conv_attn is not None and init == "paper":
            nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
        last = [m.fc2 for m in (self.mlp_add, self.mlp_scale if init == "identity" else None) if m is not None]
        zero_(*last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        ones = (1,) * (x.ndim - 2)
        if self.conv_attn is not None:
            weights = self.conv_attn(x).flatten(2).softmax(-1).unsqueeze(3)  # (N, 1, S, 1)
            context = (x.flatten(2).unsqueeze(1) @ weights).view(n, c, *ones)  # (N, 1, C, S) @ (N, 1, S, 1)
        else:
            context = x.mean(tuple(range(2, x.ndim)), keepdim=True)
        y = x
        if self.mlp_scale is not None:
            y = apply_gate(y, self.mlp_scale(context), self.gain)
        if self.mlp_add is not None:
            y = y + self.mlp_add(context)
        return y

    def extra_repr(self) -> str:
        return f"init={self.init!r}"
