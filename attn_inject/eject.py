"""Eject: take every injected block out of a model and give back its original forwards.

``inject`` remembers on the model how to undo each splice (the blocks it registered, the forwards
it replaced, the empty attribute slots a block took); ``eject`` runs those in reverse order. The
result has the original ``state_dict`` keys, and a freshly patched model computes exactly what it
computed before ``inject``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from torch import nn

from .errors import AttnInjectError
from .recipe import recipe_of, set_recipe
from .splice import Undo

_ATTRIBUTE = "_attn_inject_undo"


def record_undo(model: nn.Module, undo: Undo) -> None:
    """Remember how to take back one ``inject`` (called by ``inject`` after it succeeded)."""
    model.__dict__.setdefault(_ATTRIBUTE, []).append(undo)


def eject(model: nn.Module) -> nn.Module:
    """Remove every block ``inject`` added to ``model`` (in place); returns the model."""
    undos = model.__dict__.get(_ATTRIBUTE)
    if not undos:
        raise AttnInjectError(
            f"{type(model).__name__} holds no injected blocks to eject",
            hint="eject() takes a model patched by inject() or returned by load().",
        )
    for undo in reversed(undos):
        undo()
    del model.__dict__[_ATTRIBUTE]
    recipe = recipe_of(model)
    if recipe is not None:
        set_recipe(model, dataclasses.replace(recipe, injections=()))
    return model


def eject_file(path: str | os.PathLike, output: str | os.PathLike, *, arch: str | None = None, force: bool = False,
               trust_remote_code: bool = False) -> dict:  # fmt: skip
    """Write the original model's weights (a plain .safetensors) from a patched file; checked on read-back."""
    from safetensors.torch import load_file, save_file

    from .safe_output import atomic_write, check_output
    from .saving import load, storable
    from .verify import bitwise_equal

    out = check_output(output, inputs=[path], force=force)
    if out.suffix != ".safetensors":
        raise AttnInjectError("the output must be a .safetensors file", where=str(out), hint="Name it NAME.safetensors.")
    model = load(path, arch, trust_remote_code=trust_remote_code)
    removed = list(recipe_of(model).modules)
    state = eject(model).state_dict()
    tensors = storable(state)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        back = load_file(str(tmp))
        if set(back) != set(tensors) or not all(bitwise_equal(back[k], v) for k, v in tensors.items()):
            raise AttnInjectError("the written weights do not read back bit for bit; nothing was written", where=str(out))

    atomic_write(out, write)
    return {"input": str(path), "output": str(out), "arch": recipe_of(model).arch, "removed": removed,
            "tensors": len(tensors), "bytes": out.stat().st_size}  # fmt: skip
