"""Adapters: files holding only the injected blocks' tensors, the recipe and a fingerprint of the base
weights, and ``apply_adapter``, which patches the base model with one.

For ECA on ResNet-50 that is a few kilobytes. ``apply_adapter(model, path)`` checks that ``model``
is the base the adapter was made from (same tensor names and shapes, same values: the fingerprint
says which differs), replays the recipe and loads the blocks' tensors: the result equals the full
patched model exactly.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..errors import AttnInjectError
from ..graph.example import parameter_dtype_device
from ..surgery.checks import check_model
from ..surgery.eject import eject
from ..surgery.recipe import injected_key, recipe_of
from .format import (
    DAMAGED_HINT,
    check_finite,
    file_header,
    fingerprint,
    misfit,
    patched_recipe,
    read_tensors,
    structure_hash,
)
from .saving import check_replayable, replay


def apply_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Patch the base ``model`` (in place) with an adapter file written by ``save(..., adapter_only=True)``."""
    check_model(model)
    header = file_header(path)
    recipe = patched_recipe(header)
    if header.content != "adapter":
        raise AttnInjectError(
            "the file holds a whole patched model, not an adapter",
            where=str(header.path),
            hint="Read it with attn_inject.load(path).",
        )
    known = recipe_of(model)
    if known is not None and known.injections:
        raise AttnInjectError(
            f"{type(model).__name__} already holds injected blocks",
            where=str(header.path),
            hint="Apply an adapter to the base model (eject() the blocks first).",
        )
    _check_base(model, header.fingerprint, header.path)
    check_replayable(recipe, model, str(header.path))
    tensors = read_tensors(header.path, parameter_dtype_device(model)[1])
    check_finite(tensors, header.path)
    try:
        replay(model, recipe, str(header.path))
        expected = model.state_dict()
        injected = {k for k in expected if injected_key(k, set(recipe.modules))}
        if injected != set(tensors):
            raise AttnInjectError(
                f"the adapter's tensors do not fit its blocks: missing {sorted(injected - set(tensors))[:3]}, "
                f"unexpected {sorted(set(tensors) - injected)[:3]}",
                where=str(header.path),
                hint=DAMAGED_HINT,
            )
        problem = misfit(header, [k for k in expected if k in tensors], expected, False, DAMAGED_HINT)
        if problem:
            raise AttnInjectError(
                f"the adapter's tensors do not fit its blocks: {problem[0]}", where=str(header.path), hint=problem[1]
            )
        model.load_state_dict(tensors, strict=False)
    except BaseException:
        patched = recipe_of(model)
        if patched is not None and patched.injections:
            eject(model)
        raise
    return model


def _check_base(model: nn.Module, stored: str | None, source) -> None:
    try:
        expected = json.loads(stored or "")
        arch = expected["arch"]
        want = {k: expected[k] for k in ("tensors", "structure", "weights")}
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
        raise AttnInjectError(
            "the adapter's base fingerprint is missing or damaged",
            where=str(source),
            hint="Write the adapter again with save(..., adapter_only=True).",
        ) from None
    state = model.state_dict()
    got = fingerprint(state)
    made_for = f"{arch or 'an unnamed arch'} ({want['tensors']} tensors)"
    if got["structure"] != want["structure"]:
        floats = next((d for d in FLOAT_DTYPES if structure_hash(state, floats_as=d) == want["structure"]), None)
        if floats is not None:
            held = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
            raise AttnInjectError(
                f"the adapter was made for {made_for} with {str(floats).removeprefix('torch.')} weights; "
                f"{type(model).__name__} has the same tensors in other dtypes ({', '.join(held)})",
                where=str(source),
                hint=f"Convert the base first (model.to({floats})), then apply the adapter.",
            )
        raise AttnInjectError(
            f"the adapter was made for another architecture: {made_for}, structure {want['structure']}; "
            f"{type(model).__name__} has {got['tensors']} tensors, structure {got['structure']}",
            where=str(source),
            hint="Apply it to the model it was made from.",
        )
    if got["weights"] != want["weights"]:
        raise AttnInjectError(
            f"the adapter was made for other weights of {made_for}: base fingerprint {want['weights']}, "
            f"this model's {got['weights']}",
            where=str(source),
            hint="Load the exact checkpoint the adapter was made from.",
        )


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
