"""save() and load(): a patched model as one .safetensors file with its recipe in the metadata.

The file holds the patched model's state_dict (or, as an adapter file, only the injected blocks'
tensors and a fingerprint of the base weights) and, under ``attn_inject.recipe``, the JSON recipe
(arch, each injection with its rules' YAML, format version, library versions). ``load`` rebuilds
the architecture, replays the recipe and loads the tensors strictly. Nothing in the file is
imported, called or unpickled: a recipe naming ``package.module:factory`` is only built when the
caller names that arch (or passes ``trust_remote_code=True``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import AttnInjectError
from ..graph.example import parameter_dtype_device, seeded_tensors
from ..surgery.api import inject
from ..surgery.recipe import Recipe, base_recipe, injected_key, patched_recipe_of
from .arch import head_outputs
from .checkpoints import model_holding
from .data_config import data_info_of, remember_data
from .format import (
    CONTENT_KEY,
    FINGERPRINT_KEY,
    RECIPE_KEY,
    adapter_tensors,
    file_header,
    patched_recipe,
    read_tensors,
    storable,
)
from .output import atomic_write, check_safetensors_output


def save(model: nn.Module, path: str | os.PathLike, *, force: bool = False, adapter_only: bool = False) -> Path:
    """Write a model as .safetensors with its recipe; returns the path.

    A model ``inject`` patched (or ``load`` read) is written with every injection; any other model
    as a plain model with its arch (when known: a timm model, or one built from an arch string),
    which ``load`` reads back too. The recipe records the head the model has now (its
    ``num_classes``), and the file carries the model's data config and class names (timm's
    ``pretrained_cfg``) when it has them. Refuses an existing ``path`` unless ``force``; writes
    atomically. ``adapter_only`` keeps only the injected blocks' tensors and a fingerprint of the
    base weights (see ``apply_adapter``).
    """
    return write_patched(model, path, force=force, adapter_only=adapter_only)


def write_patched(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    force: bool = False,
    adapter_only: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """``save``; ``check(tmp)`` runs on the written temporary file before it is renamed into place."""
    recipe = saved_recipe(model)
    if adapter_only:
        patched_recipe_of(model)  # an adapter of a model without blocks would be empty
    out = check_safetensors_output(path, force=force)
    metadata = {"format": "pt", RECIPE_KEY: recipe.to_json(), CONTENT_KEY: "adapter" if adapter_only else "model"}
    state = model.state_dict()
    if adapter_only:
        state, metadata[FINGERPRINT_KEY] = adapter_tensors(state, recipe)
    else:
        metadata.update(data_info_of(model).metadata())
    tensors = storable(state)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        if check is not None:
            check(tmp)

    atomic_write(out, write)
    return out


def saved_recipe(model: nn.Module) -> Recipe:
    """The recipe ``save`` writes for ``model``: what it remembers (or its timm arch), with the head it has now."""
    recipe = base_recipe(model)
    head = head_outputs(model, recipe.arch)
    if head is not None and head != recipe.num_classes:
        recipe = dataclasses.replace(recipe, num_classes=head)
    return recipe


def load(
    path: str | os.PathLike,
    arch: str | None = None,
    *,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    model_options: dict[str, Any] | None = None,
) -> nn.Module:
    """The model in a file written by ``save``, ``attn-inject patch`` or ``finetune``, in eval mode.

    Rebuilds the architecture (``arch`` overrides the recipe's; ``num_classes`` too), replays the
    recipe's injections (none for a plain model saved with its arch) and loads every tensor
    strictly; ``map_location`` is the device the tensors and model go to, ``dtype`` casts
    floating-point parameters afterwards. The recipe is remembered on the model, so ``save`` and
    ``eject`` work on the result; the data config and class names the file carries go to the
    model's ``pretrained_cfg``, where timm's ``resolve_data_config(model=model)`` finds them.
    ``model_options``: further arguments of the model's factory that change training only (timm's
    ``drop_path_rate``).
    """
    header = file_header(path)
    recipe = patched_recipe(header)
    if header.content == "adapter":
        raise AttnInjectError(
            "the file is an adapter: it holds only the injected blocks",
            where=str(header.path),
            hint="Build the base model and call attn_inject.apply_adapter(model, path).",
        )
    build_arch = arch_to_build(recipe, arch, trust_remote_code, header.path)
    device = torch.device(map_location)
    tensors = read_tensors(header.path, device)
    classes = num_classes if num_classes is not None else recipe.num_classes
    model = rebuild(recipe, build_arch, classes, tensors, header.path, model_options)
    remember_data(model, header.data)
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def rebuild(
    recipe: Recipe,
    arch: str,
    num_classes: int | None,
    tensors: dict[str, torch.Tensor],
    source: Path,
    model_options: dict[str, Any] | None = None,
) -> nn.Module:
    """``arch`` with the recipe replayed, holding ``tensors`` (every key, strictly)."""
    injected = set(recipe.modules)
    base = {k: v for k, v in tensors.items() if not injected_key(k, injected)}
    model = model_holding(arch, num_classes, lambda m: _base_weights(m, base, source), model_options)
    replay(model, recipe, str(source))
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing or extra:
        raise AttnInjectError(
            f"the file does not hold what its recipe builds: missing {missing[:3]}, unexpected {extra[:3]}",
            where=str(source),
            hint="The file is damaged or was edited; write it again with save().",
        )
    model.load_state_dict({k: v for k, v in tensors.items() if injected_key(k, injected)}, strict=False)
    return model


def _base_weights(model: nn.Module, base: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    target = model.state_dict()
    missing = [k for k in target if k not in base]
    bad = [k for k in target if k in base and base[k].shape != target[k].shape]
    extra = [k for k in base if k not in target]
    if missing or bad or extra:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {extra[:3]}"
            if extra
            else f"{bad[0]} has shape {list(base[bad[0]].shape)} where the model needs {list(target[bad[0]].shape)}"
        )
        raise AttnInjectError(
            f"the file's weights do not fit {type(model).__name__}: {detail}",
            where=str(source),
            hint="Pass the arch (and num_classes) the file was written for.",
        )
    return base


def replay(model: nn.Module, recipe: Recipe, source: str) -> None:
    """Inject each of the recipe's injections into ``model``, checking each lands where it did."""
    for i, injection in enumerate(recipe.injections):
        inject(
            model,
            injection.block,
            list(injection.rules),
            include=injection.include,
            exclude=injection.exclude,
            position=injection.position,
            example_input=_example(model, injection.input_shapes),
            verify=False,
            **dict(injection.options),
        )
        landed = patched_recipe_of(model).injections[-1].modules
        if injection.modules and landed != injection.modules:
            raise AttnInjectError(
                f"injection {i} ({injection.block}) of the recipe put {len(landed)} blocks at other places than "
                f"the {len(injection.modules)} recorded (e.g. {sorted(set(landed) ^ set(injection.modules))[:2]})",
                where=source,
                hint="Pass the arch the file was written for.",
            )


def _example(model: nn.Module, shapes: tuple[tuple[int, ...], ...] | None) -> tuple | None:
    return None if shapes is None else seeded_tensors(shapes, *parameter_dtype_device(model))


def arch_to_build(recipe: Recipe, arch: str | None, trust_remote_code: bool, source: Path) -> str:
    """The arch ``load`` builds: the caller's, or the recipe's when that runs no code named by the file."""
    if arch is not None:
        return arch
    if recipe.arch is None:
        raise AttnInjectError(
            "the file's recipe does not name its architecture",
            where=str(source),
            hint="Pass arch=... (--arch) naming the model it was written for.",
        )
    if ":" in recipe.arch and not recipe.arch.startswith("torchvision:") and not trust_remote_code:
        raise AttnInjectError(
            f"the recipe names the factory {recipe.arch!r}, and a file is never allowed to import code",
            where=str(source),
            hint=f"If you trust it, pass arch={recipe.arch!r} (--arch) or trust_remote_code=True.",
        )
    return recipe.arch
