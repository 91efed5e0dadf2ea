"""Maps of any number of spatial dims for the blocks: (B, C, L), (B, C, H, W), (B, C, D, H, W).

A block that takes ``spatial_dims`` (1, 2 or 3; the plan passes the site's, registry.SITE_FACTS)
serves maps of that many spatial axes; it pools over all of them and builds its layers of those
dims. A block without that option is 2-D only, and the plan refuses other maps for it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AttnInjectError

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d
CONVS: dict[int, type[Conv]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}  # spatial dims -> conv
LAYOUTS = {1: "NCL", 2: "NCHW", 3: "NCDHW"}  # spatial dims -> the map's layout, in words


def conv_of_dims(spatial_dims: int, block: str) -> type[Conv]:
    """The conv class for ``spatial_dims``, checked (a block's constructor calls it)."""
    if isinstance(spatial_dims, bool) or spatial_dims not in CONVS:
        raise AttnInjectError(
            f"{block} needs spatial_dims 1, 2 or 3 (NCL, NCHW or NCDHW maps); got spatial_dims={spatial_dims!r}"
        )
    return CONVS[spatial_dims]


def spatial_axes(x: torch.Tensor) -> tuple[int, ...]:
    """The spatial axes of a (B, C, *spatial) map: 2 and up."""
    return tuple(range(2, x.dim()))


def pooled_shape(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B, C, 1) gate as (B, C, 1, ...) with one axis per spatial axis of ``x``."""
    return y.reshape(y.shape[:2] + (1,) * (x.dim() - 2))
