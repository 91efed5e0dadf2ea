"""The file format: a .safetensors file whose metadata holds the recipe (``attn_inject.recipe``),
what it contains (a whole patched model or an adapter) and, for an adapter, a fingerprint of the
base weights; reading its header and tensors, and what a tensor dict must be to be written."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import AttnInjectError, first_line
from ..surgery.recipe import Recipe, injected_key
from .data_config import DataInfo, read_data_info

RECIPE_KEY = "attn_inject.recipe"
CONTENT_KEY = "attn_inject.content"  # "model" | "adapter"
FINGERPRINT_KEY = "attn_inject.base_fingerprint"
CONTENTS = ("model", "adapter")


@dataclass(frozen=True)
class Header:
    """What a .safetensors file says about itself, read without loading its tensors."""

    path: Path
    recipe: Recipe | None  # None: a plain checkpoint
    content: str
    fingerprint: str | None
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    data: DataInfo = field(default_factory=DataInfo)  # the data config and class names it carries, if any

    @property
    def plain(self) -> bool:
        """No injected blocks: a plain checkpoint, or a plain model saved with its arch."""
        return self.recipe is None or not self.recipe.injections


def file_header(path: str | os.PathLike) -> Header:
    """The recipe, content kind and tensor shapes of a .safetensors file (no tensor is read)."""
    path = Path(path)
    if not path.exists():
        raise AttnInjectError("no such file", where=str(path), hint="Check the path.")
    if not path.is_file():
        raise AttnInjectError("not a file (a folder?)", where=str(path), hint="Give the path of a .safetensors file.")
    if path.suffix != ".safetensors":
        raise AttnInjectError(
            f"not a .safetensors file ({path.suffix or 'no suffix'})",
            where=str(path),
            hint="Patched models are .safetensors files written by save() or `attn-inject patch`.",
        )
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            shapes, dtypes = {}, {}
            for key in handle.keys():  # noqa: SIM118 - safe_open has keys() but no __iter__
                tensor_slice = handle.get_slice(key)
                shapes[key], dtypes[key] = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
    except (SafetensorError, OSError, ValueError) as exc:
        raise unreadable(path, exc) from None
    text = metadata.get(RECIPE_KEY)
    recipe = None if text is None else Recipe.from_json(text, where=f"{path}: recipe")
    content = metadata.get(CONTENT_KEY, "model")
    if content not in CONTENTS:
        raise AttnInjectError(
            f"unknown content kind {content!r} in the metadata",
            where=str(path),
            hint="The file was written by a newer attn_inject or edited; upgrade attn_inject.",
        )
    data = read_data_info(metadata, str(path))
    return Header(path, recipe, content, metadata.get(FINGERPRINT_KEY), shapes, dtypes, data)


def patched_recipe(header: Header) -> Recipe:
    """The file's recipe; a plain checkpoint (no recipe) is refused."""
    if header.recipe is None:
        raise AttnInjectError(
            "a plain checkpoint: the file holds no attn_inject recipe",
            where=str(header.path),
            hint="load() reads files written by save() or `attn-inject patch`; "
            "for a plain checkpoint use attn_inject.checkpoint.load_pretrained(path, arch).",
        )
    return header.recipe


def read_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, on ``device``."""
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise unreadable(path, exc) from None


def unreadable(path: Path, exc: Exception) -> AttnInjectError:
    return AttnInjectError(
        f"not a valid .safetensors file ({first_line(exc)})",
        where=str(path),
        hint="The file is truncated or damaged; write it again.",
    )


def storable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: detached, contiguous, none sharing memory with another."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        value = value.detach()
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if ptr in seen or not value.is_contiguous():
            value = value.contiguous().clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = value
    return out


def adapter_tensors(state: dict[str, torch.Tensor], recipe: Recipe) -> tuple[dict[str, torch.Tensor], str]:
    """What an adapter file holds of a patched state_dict: the injected blocks' tensors, and the
    fingerprint (JSON) of the rest, the base weights."""
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
