"""The file format: a .safetensors file whose metadata holds the recipe (``attn_inject.recipe``),
what it contains (a whole patched model or an adapter) and, for an adapter, a fingerprint of the
base weights; reading its header and tensors, and what a tensor dict must be to be written."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import AttnInjectError, one_line
from ..surgery.recipe import Recipe, canonical_json, injected_key
from .container import damaged, read_header
from .data_config import DataInfo, read_data_info

RECIPE_KEY = "attn_inject.recipe"
CONTENT_KEY = "attn_inject.content"  # "model" | "adapter"
FINGERPRINT_KEY = "attn_inject.base_fingerprint"
CONTENTS = ("model", "adapter")
ARCH_HINT = "Pass the arch (and num_classes) the file was written for."
DAMAGED_HINT = "The file is damaged or was edited; write it again with save()."


@dataclass(frozen=True)
class Header:
    """What a .safetensors file says about itself, read without loading its tensors."""

    path: Path
    recipe: Recipe | None  # None: a plain checkpoint
    content: str
    fingerprint: str | None
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    data: DataInfo = field(default_factory=DataInfo)  # the data config and class names it carries, if any

    @property
    def plain(self) -> bool:
        """No injected blocks: a plain checkpoint, or a plain model saved with its arch."""
        return self.recipe is None or not self.recipe.injections


def header_of(path: Path, recipe: Recipe | None, tensors: Mapping[str, torch.Tensor]) -> Header:
    """The Header of tensors already in memory (what a framework's file held), for ``rebuild``."""
    return Header(
        path,
        recipe,
        "model",
        None,
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: v.dtype for k, v in tensors.items()},
    )


def file_header(path: str | os.PathLike) -> Header:
    """The recipe, content kind and tensor shapes of a .safetensors file (no tensor is read).

    The header is checked and bounded first (``container.read_header``), then the recipe
    (``Recipe.from_json``): nothing a file asks for is built or allocated before both pass.
    """
    path = Path(path)
    if not path.exists():
        raise AttnInjectError("no such file", where=str(path), hint="Check the path.")
    if path.is_dir():
        raise AttnInjectError("not a file (a folder?)", where=str(path), hint="Give the path of a .safetensors file.")
    if path.suffix != ".safetensors":
        raise AttnInjectError(
            f"not a .safetensors file ({path.suffix or 'no suffix'})",
            where=str(path),
            hint="Patched models are .safetensors files written by save() or `attn-inject patch`.",
        )
    raw = read_header(path)
    metadata = raw.metadata
    text = metadata.get(RECIPE_KEY)
    recipe = None if text is None else Recipe.from_json(text, where=f"{path}: recipe")
    content = metadata.get(CONTENT_KEY, "model")
    if content not in CONTENTS:
        raise AttnInjectError(
            f"unknown content kind {content[:40]!r} in the metadata",
            where=str(path),
            hint="The file was written by a newer attn_inject or edited; upgrade attn_inject.",
        )
    shapes = {k: e.shape for k, e in raw.tensors.items()}
    dtypes = {k: e.dtype for k, e in raw.tensors.items()}
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
    """Every tensor of a .safetensors file (its header already checked by ``file_header``), on ``device``."""
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise damaged(path, one_line(exc)) from None


def misfit(
    header: Header, keys: Iterable[str], target: Mapping[str, torch.Tensor], convert: bool, shape_hint: str
) -> tuple[str, str] | None:
    """The first of ``keys`` (in the model's order) whose shape or dtype in the file does not fit
    ``target`` (the model's state_dict): (what is wrong, what to do), or None. With ``convert``, a
    floating-point tensor may have another floating-point dtype (load(dtype=...) converts it)."""
    for key in keys:
        shape, dtype, want = header.shapes[key], header.dtypes[key], target[key]
        if shape != tuple(want.shape):
            return f"{key} has shape {list(shape)} where the model needs {list(want.shape)}", shape_hint
        floating = dtype.is_floating_point and want.dtype.is_floating_point
        if dtype != want.dtype and not (convert and floating):
            return (
                f"{key} is {_name(dtype)} where the model holds {_name(want.dtype)}",
                f"Pass dtype=torch.{_name(dtype)} to load() to convert the file's tensors."
                if floating
                else DAMAGED_HINT,
            )
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    """Refuse a file holding NaN or infinite values, naming the first such tensor."""
    for key, value in tensors.items():
        if value.is_floating_point() and not _finite(value):
            raise AttnInjectError(
                f"the file's tensor {key} holds NaN or infinite values",
                where=str(source),
                hint="The file is damaged, or was saved from a model whose training diverged.",
            )


def _finite(value: torch.Tensor) -> bool:
    """Every element finite. A NaN or an infinity makes the sum NaN or infinite, so one reduction
    answers for most tensors (a quarter of the element-wise check's time); only a sum that overflowed
    is checked element by element."""
    wide = value.float() if value.element_size() == 1 else value
    return bool(torch.isfinite(wide.sum())) or bool(torch.isfinite(wide).all())


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    return injected, canonical_json({"arch": recipe.arch, **fingerprint(base)})


def fingerprint(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """SHA-256 of the tensors' names, shapes and dtypes ("structure"), and of their bytes ("weights")."""
    weights = hashlib.sha256()
    for key in sorted(state):
        weights.update(key.encode())
        weights.update(state[key].detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return {"tensors": len(state), "structure": structure_hash(state), "weights": weights.hexdigest()[:16]}


def structure_hash(state: dict[str, torch.Tensor], floats_as: torch.dtype | None = None) -> str:
    """The "structure" of ``fingerprint``; ``floats_as`` hashes every floating-point tensor as that dtype."""
    structure = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        dtype = floats_as if floats_as is not None and value.is_floating_point() else value.dtype
        structure.update(f"{key}:{list(value.shape)}:{dtype};".encode())
    return structure.hexdigest()[:16]
