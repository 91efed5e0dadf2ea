"""Channel-attention blocks that can be spliced into a model, and their registry."""

from .eca import EfficientChannelAttention, eca_kernel_size
from .registry import (
    block_options,
    check_block_options,
    get_block,
    is_attention_block,
    list_blocks,
    register_block,
    returns_fresh_output,
)
from .se import SqueezeExcite

__all__ = [
    "EfficientChannelAttention",
    "SqueezeExcite",
    "block_options",
    "check_block_options",
    "eca_kernel_size",
    "get_block",
    "is_attention_block",
    "list_blocks",
    "register_block",
    "returns_fresh_output",
]
