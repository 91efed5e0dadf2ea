"""Ejecting a file: the original model's weights, written back from a patched file."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file

from ..errors import AttnInjectError
from ..graph.example import bitwise_equal
from ..surgery.eject import eject
from ..surgery.recipe import patched_recipe_of, recipe_of
from .container import write_safetensors
from .format import storable
from .output import atomic_write, check_safetensors_output
from .saving import load


def eject_file(
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    arch: str | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Write the original model's weights (a plain .safetensors) from a patched file; checked on read-back."""
    out = check_safetensors_output(output, inputs=[path], force=force)
    model = load(path, arch, trust_remote_code=trust_remote_code)
    remembered = recipe_of(model)  # load() always remembers one
    if remembered is None or not remembered.injections:
        raise AttnInjectError(
            "the file holds a plain model (no injected blocks): there is nothing to eject",
            where=str(path),
            hint="Use the file as it is; load() reads it.",
        )
    recipe = patched_recipe_of(model)
    removed = list(recipe.modules)
    state = eject(model).state_dict()
    tensors = storable(state)

    def write(tmp: Path) -> None:
        write_safetensors(tmp, tensors, {"format": "pt"})
        back = load_file(str(tmp))
        if set(back) != set(tensors) or not all(bitwise_equal(back[k], v) for k, v in tensors.items()):
            raise AttnInjectError(
                "the written weights do not read back bit for bit; nothing was written", where=str(out)
            )

    atomic_write(out, write)
    return {
        "input": str(path),
        "output": str(out),
        "arch": recipe.arch,
        "removed": removed,
        "tensors": len(tensors),
        "bytes": out.stat().st_size,
    }
