"""Channel-attention blocks that can be spliced into a model, and their registry."""

from .cbam import CBAM
from .coord import CoordAttention
from .eca import EfficientChannelAttention, eca_kernel_size
from .gated import Gated, gated_residual
from .gather_excite import GatherExcite
from .gct import GatedChannelTransformation
from .global_context import GlobalContext
from .registry import (
    BlockSpec,
    block_options,
    block_spec,
    check_block_options,
    get_block,
    is_attention_block,
    list_blocks,
    register_block,
    registered_block,
    spec_of,
    unregister_block,
)
from .se import SqueezeExcite
from .simam import SimAM

__all__ = [
    "CBAM",
    "BlockSpec",
    "CoordAttention",
    "EfficientChannelAttention",
    "Gated",
    "GatedChannelTransformation",
    "GatherExcite",
    "GlobalContext",
    "SimAM",
    "SqueezeExcite",
    "block_options",
    "block_spec",
    "check_block_options",
    "eca_kernel_size",
    "gated_residual",
    "get_block",
    "is_attention_block",
    "list_blocks",
    "register_block",
    "registered_block",
    "spec_of",
    "unregister_block",
]
