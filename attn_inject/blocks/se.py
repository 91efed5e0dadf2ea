"""Squeeze-and-Excitation (Hu, Shen, Albanie, Sun, Wu; arXiv 1709.01507).

    s = gate(W2 · act(W1 · GAP(x))),  y = x ⊙ s

``W1`` reduces C channels to a reduced width, ``W2`` restores C. The FC layers are 1x1
convolutions on the pooled map (the same maths, and the layout and submodule names
``fc1``/``act``/``fc2`` of timm's ``SEModule``).

Reduced width: ``rd_channels`` if given; else ``base / reduction`` (or ``base * rd_ratio``) rounded
to a multiple of ``rd_divisor``, at least ``rd_divisor``, bumped up one step when rounding lost more
than ``1 - rd_round_limit`` (timm's ``make_divisible``). ``base`` is the block's own channels
(``rd_of="channels"``: SE-ResNet, MobileNetV3) or the channels entering the block it serves
(``rd_of="input"``: RegNetY and EfficientNet put ``se_ratio`` x input channels); the plan passes
those as ``block_in_channels`` from the site. ``act`` is ReLU (the paper) or SiLU (EfficientNet);
``gate`` the sigmoid or the hard sigmoid (MobileNetV3).

``init="identity"`` zeroes ``fc2`` (weight and bias) and uses a gain-2 gate: the block is the
identity when inserted (both gates give exactly 0.5 at 0) and its Jacobian is the identity, so
fine-tuning starts from the original model; ``fc2`` still receives a gradient at step 0.
``init="paper"`` keeps PyTorch's default init and the plain gate.

``spatial_dims`` (1, 2 or 3; the plan passes the site's) makes the 1x1 convs ``Conv1d``/``Conv2d``/
``Conv3d`` and pools over every spatial axis: the same parameters at every dimension (MONAI's
``ChannelSELayer`` holds the same maths as linears on the pooled vector).
"""

from __future__ import annotations

import torch
from timm.layers import make_divisible
from torch import nn

from ..errors import AttnInjectError
from .gate import apply_gate, gate_function, gate_gain
from .registry import register_block
from .spatial import conv_of_dims, spatial_axes

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU}
RD_BASES = ("channels", "input")


@register_block("se", gate="fc2", fresh_output=True)
class SqueezeExcite(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        rd_ratio: float | None = None,
        rd_of: str = "channels",
        rd_round_limit: float = 0.0,
        act: str = "relu",
        gate: str = "sigmoid",
        block_in_channels: int | None = None,
        spatial_dims: int = 2,
        init: str = "identity",
    ):
        super().__init__()
        if (
            reduction <= 0
            or rd_divisor < 1
            or (rd_channels is not None and rd_channels < 1)
            or (rd_ratio is not None and rd_ratio <= 0)
        ):
            raise AttnInjectError(
                "SE needs reduction > 0, rd_ratio > 0, rd_divisor >= 1 and rd_channels >= 1; "
                f"got reduction={reduction}, "
                f"rd_ratio={rd_ratio}, rd_divisor={rd_divisor}, rd_channels={rd_channels}"
            )
        if rd_of not in RD_BASES:
            raise AttnInjectError(f"unknown SE rd_of {rd_of!r}", hint=f"Valid: {', '.join(RD_BASES)}.")
        if act not in ACTIVATIONS:
            raise AttnInjectError(f"unknown SE act {act!r}", hint=f"Valid activations: {', '.join(ACTIVATIONS)}.")
        conv = conv_of_dims(spatial_dims, "SE")
        self.gain = gate_gain(init)
        self.gate = gate_function(gate)
        self.init, self.gate_name = init, gate
        base = block_in_channels if rd_of == "input" and block_in_channels else channels
        scaled = base * rd_ratio if rd_ratio is not None else base / reduction
        rd = rd_channels or make_divisible(scaled, rd_divisor, round_limit=rd_round_limit)
        self.fc1 = conv(channels, rd, kernel_size=1, bias=True)
        self.act = ACTIVATIONS[act](inplace=True)
        self.fc2 = conv(rd, channels, kernel_size=1, bias=True)
        if init == "identity":
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)  # type: ignore[arg-type]  # bias=True above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc2(self.act(self.fc1(x.mean(spatial_axes(x), keepdim=True))))
        return apply_gate(x, z, self.gain, self.gate)

    def extra_repr(self) -> str:
        return f"init={self.init!r}, gate={self.gate_name!r}"
