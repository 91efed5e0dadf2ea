"""Verification after a splice: when the patched model's output differs, tell why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import AttnInjectError
from ..graph.example import bitwise_equal, first_difference


def mismatch_error(
    what: str,
    problem: str,
    rerun_original: Callable[[], Any],
    expected: Any,
    blocks: dict[str, nn.Module],
    example: dict[str, torch.Tensor],
) -> AttnInjectError:
    """Why the patched model's output differed, told apart: the original model is not
    deterministic (it differs from itself), a block is not the identity when built, or a bug here."""
    base = f"{what}: {problem}; the model was left unchanged"
    again = first_difference(expected, rerun_original())
    if again:
        return AttnInjectError(
            f"{base}. The original model itself gives different outputs on the same input ({again}), so "
            "its outputs cannot be compared",
            hint="Make its forward deterministic for the check (eval mode, no randomness), or pass verify=False.",
        )
    for name, block in blocks.items():
        x = example[name]
        with torch.no_grad():
            y = block(x.clone())
        if not (isinstance(y, torch.Tensor) and bitwise_equal(x, y)):
            return AttnInjectError(
                f"{base}. Block {name} ({type(block).__name__}) does not return its input unchanged when built",
                hint="A block built with init='identity' must be the identity (see attn_inject.blocks.registry); "
                "pass verify=False to inject it anyway.",
            )
    return AttnInjectError(
        base, hint="This is a bug in attn_inject: please report it with the model. Pass verify=False to skip the check."
    )
