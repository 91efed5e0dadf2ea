"""Channel-attention blocks that can be spliced into a model, and their registry."""

from .eca import EfficientChannelAttention, eca_kernel_size
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

__all__ = [
    "BlockSpec",
    "EfficientChannelAttention",
    "SqueezeExcite",
    "block_options",
    "block_spec",
    "check_block_options",
    "eca_kernel_size",
    "get_block",
    "is_attention_block",
    "list_blocks",
    "register_block",
    "registered_block",
    "spec_of",
    "unregister_block",
]
