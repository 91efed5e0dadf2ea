"""Adapter files: only the injected blocks' tensors, the recipe, and a fingerprint of the base weights.

For ECA on ResNet-50 that is a few kilobytes. ``apply_adapter(model, path)`` checks that ``model``
is the base the adapter was made from (same tensor names and shapes, same values: the fingerprint
says which differs), replays the recipe and loads the blocks' tensors: the result equals the full
patched model exactly.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from .errors import AttnInjectError
from .recipe import Recipe, injected_key, recipe_of


def adapter_tensors(state: dict[str, torch.Tensor], recipe: Recipe) -> tuple[dict[str, torch.Tensor], str]:
    """The injected blocks' tensors of a patched state_dict, and the fingerprint of the rest."""
    modules = set(recipe.modules)
    injected = {k: v for k, v in state.items() if injected_key(k, modules)}
    base = {k: v for k, v in state.items() if k not in injected}
    return injected, json.dumps({"arch": recipe.arch, **fingerprint(base)})


def fingerprint(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """SHA-256 of the tensors' names, shapes and dtypes ("structure"), and of their bytes ("weights")."""
    structure, weights = hashlib.sha256(), hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach()
        structure.update(f"{key}:{list(value.shape)}:{value.dtype};".encode())
        weights.update(key.encode())
        weights.update(value.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return {"tensors": len(state), "structure": structure.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


def apply_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Patch the base ``model`` (in place) with an adapter file written by ``save(..., adapter_only=True)``."""
    from .eject import eject
    from .saving import _read_tensors, file_header, patched_recipe, replay

    header = file_header(path)
    recipe = patched_recipe(header)
    if header.content != "adapter":
        raise AttnInjectError("the file holds a whole patched model, not an adapter", where=str(header.path),
                              hint="Read it with attn_inject.load(path).")  # fmt: skip
    known = recipe_of(model)
    if known is not None and known.injections:
        raise AttnInjectError(f"{type(model).__name__} already holds injected blocks", where=str(header.path),
                              hint="Apply an adapter to the base model (eject() the blocks first).")  # fmt: skip
    _check_base(model, header.fingerprint, header.path)
    first = next(model.parameters(), None)
    tensors = _read_tensors(header.path, first.device if first is not None else torch.device("cpu"))
    try:
        replay(model, recipe, str(header.path))
        injected = {k for k in model.state_dict() if injected_key(k, set(recipe.modules))}
        if injected != set(tensors):
            raise AttnInjectError(
                f"the adapter's tensors do not fit its blocks: missing {sorted(injected - set(tensors))[:3]}, "
                f"unexpected {sorted(set(tensors) - injected)[:3]}", where=str(header.path),
                hint="The file is damaged or was edited; write it again.",
            )  # fmt: skip
        model.load_state_dict(tensors, strict=False)
    except BaseException:
        if recipe_of(model) is not None and recipe_of(model).injections:
            eject(model)
        raise
    return model


def _check_base(model: nn.Module, stored: str | None, source) -> None:
    try:
        expected = json.loads(stored or "")
        arch = expected["arch"]
        want = {k: expected[k] for k in ("tensors", "structure", "weights")}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise AttnInjectError("the adapter's base fingerprint is missing or damaged", where=str(source),
                              hint="Write the adapter again with save(..., adapter_only=True).") from None  # fmt: skip
    got = fingerprint(model.state_dict())
    made_for = f"{arch or 'an unnamed arch'} ({want['tensors']} tensors)"
    if got["structure"] != want["structure"]:
        raise AttnInjectError(
            f"the adapter was made for another architecture: {made_for}, structure {want['structure']}; "
            f"{type(model).__name__} has {got['tensors']} tensors, structure {got['structure']}", where=str(source),
            hint="Apply it to the model it was made from.",
        )  # fmt: skip
    if got["weights"] != want["weights"]:
        raise AttnInjectError(
            f"the adapter was made for other weights of {made_for}: base fingerprint {want['weights']}, "
            f"this model's {got['weights']}", where=str(source),
            hint="Load the exact checkpoint the adapter was made from.",
        )  # fmt: skip

