"""Verification after a splice: the alternate forwards (``forward_fuse``...) patched alike, and when
the patched model's output differs, or its forward fails, why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import AttnInjectError, one_line
from ..graph.example import bitwise_equal, first_difference, seeded_tensors
from ..graph.nodes import NodeFacts, facts
from ..matching.alternates import Alternate
from ..patched import patched_forward

BLOCK_HINT = (
    "A block built with init='identity' must be the identity (see attn_inject.blocks.registry); "
    "pass verify=False to inject it anyway."
)
BUG_HINT = "This is a bug in attn_inject: please report it with the model. Pass verify=False to skip the check."


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
    block = block_problem(blocks, example)
    return AttnInjectError(f"{base}. {block}", hint=BLOCK_HINT) if block else AttnInjectError(base, hint=BUG_HINT)


def forward_failed_error(
    what: str, exc: Exception, blocks: dict[str, nn.Module], example: dict[str, torch.Tensor]
) -> AttnInjectError:
    """The patched model's forward raised: name the block that fails on its own, if one does."""
    base = f"{what}: the patched model's forward failed ({one_line(exc)}); the model was left unchanged"
    block = block_problem(blocks, example)
    return AttnInjectError(f"{base}. {block}", hint=BLOCK_HINT) if block else AttnInjectError(base, hint=BUG_HINT)


def block_problem(blocks: dict[str, nn.Module], example: dict[str, torch.Tensor]) -> str | None:
    """The first block that, run alone on a map of its site, raises, changes the map's dtype or
    shape, or does not return it unchanged; None when every block is the identity."""
    for name, block in blocks.items():
        x = example[name]
        label = f"Block {name} ({type(block).__name__})"
        try:
            with torch.no_grad():
                y = block(x.clone())
        except Exception as exc:
            return f"{label} raises {one_line(exc)} on a {_describe(x)} map"
        if not isinstance(y, torch.Tensor):
            return f"{label} returns {type(y).__name__}, not a tensor"
        if y.dtype != x.dtype or y.shape != x.shape:
            return f"{label} returns a {_describe(y)} map for a {_describe(x)} one"
        if not bitwise_equal(x, y):
            return f"{label} does not return its input unchanged when built"
    return None


def _describe(x: torch.Tensor) -> str:
    return f"{str(x.dtype).removeprefix('torch.')} {list(x.shape)}"


def alternates_differ(alternates: tuple[Alternate, ...]) -> str | None:
    """Whether a patched alternate forward (blocks at their identity init) computes anything but
    the method it replaced, on a random input of the shapes its forward was called with."""
    for alternate in alternates:
        module, method = alternate.record.module, alternate.method
        args = _random_inputs([facts(n) for n in alternate.record.traced_graph.find_nodes(op="placeholder")])
        if args is None:
            continue  # not only tensors: the model-level check covers what it can
        patched = patched_forward(module, method)
        if patched is None:
            raise AssertionError(f"{method} of {alternate.record.path} was not patched")
        with torch.no_grad():
            problem = first_difference(patched.call_previous(*args), patched(*args))
        if problem:
            return f"{alternate.record.path or '<model>'}.{method} differs from the original: {problem}"
    return None


def _random_inputs(placeholders: list[NodeFacts]) -> tuple[torch.Tensor, ...] | None:
    """Seeded random tensors like those the example forward passed, or None if not all were tensors."""
    specs = [(f.shape, f.dtype, f.device) for f in placeholders]
    if not specs or any(shape is None or dtype is None or device is None for shape, dtype, device in specs):
        return None
    drawn = seeded_tensors([shape for shape, _, _ in specs if shape is not None], torch.float32, torch.device("cpu"))
    return tuple(x.to(device, dtype) for x, (_, dtype, device) in zip(drawn, specs))
