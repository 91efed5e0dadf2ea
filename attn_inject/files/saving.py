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
from torch import nn

from ..errors import AttnInjectError, one_line
from ..graph.example import configured_input_size, example_shapes_problem, parameter_dtype_device, seeded_tensors
from ..surgery.api import inject
from ..surgery.frameworks import FRAMEWORKS, builder, library_call, owners, unwrapped
from ..surgery.recipe import Recipe, base_recipe, check_num_classes, injected_key, patched_recipe_of
from .arch import default_input_size, head_outputs
from .checkpoints import model_holding
from .container import write_safetensors
from .data_config import data_info_of, remember_data
from .format import (
    ARCH_HINT,
    CONTENT_KEY,
    DAMAGED_HINT,
    FINGERPRINT_KEY,
    RECIPE_KEY,
    Header,
    adapter_tensors,
    check_finite,
    file_header,
    misfit,
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
    base weights (see ``apply_adapter``). A framework's object holding the model (an ultralytics
    ``YOLO``) saves the model it holds.
    """
    return write_patched(unwrapped(model), path, force=force, adapter_only=adapter_only)


def write_patched(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    force: bool = False,
    adapter_only: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """``save``; ``check(tmp)`` runs on the written temporary file before it is renamed into place.

    What ``load`` would refuse is refused here, before anything is written: an example input larger
    than a file may ask for, and NaN or infinite values.
    """
    recipe = saved_recipe(model)
    if adapter_only:
        patched_recipe_of(model)  # an adapter of a model without blocks would be empty
    out = check_safetensors_output(path, force=force)
    # load() bounds the example by the rebuilt model's size: its arch's default, which fine-tuning at
    # another size (the model's data config now) does not change
    check_replayable(recipe, model, "the model's recipe", default_input_size(recipe.arch))
    metadata = {"format": "pt", RECIPE_KEY: recipe.to_json(), CONTENT_KEY: "adapter" if adapter_only else "model"}
    state = model.state_dict()
    if adapter_only:
        state, metadata[FINGERPRINT_KEY] = adapter_tensors(state, recipe)
    else:
        metadata.update(data_info_of(model).metadata())
    tensors = storable(state)
    check_finite(tensors, out)

    def write(tmp: Path) -> None:
        write_safetensors(tmp, tensors, metadata)
        if check is not None:
            check(tmp)

    atomic_write(out, write)
    return out


def saved_recipe(model: nn.Module) -> Recipe:
    """The recipe ``save`` writes for ``model``: what it remembers (or its timm arch), with the head it
    has now. A model a framework names (ultralytics) is named as it is now: training may have changed its classes."""
    recipe = base_recipe(model)
    for framework in owners(model):
        named = framework.arch(model)
        if named is not None:
            return dataclasses.replace(recipe, arch=named[0], num_classes=named[1])
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
    strictly: each must have the rebuilt model's shape and dtype and hold finite values, or the first
    that does not is named. ``map_location`` is the device the tensors and model go to; ``dtype``
    casts floating-point parameters afterwards (and only then may the file's floating-point tensors
    have another dtype: they are converted). The recipe is remembered on the model, so ``save`` and
    ``eject`` work on the result; the data config and class names the file carries go to the
    model's ``pretrained_cfg``, where timm's ``resolve_data_config(model=model)`` finds them.
    ``model_options``: further arguments of the model's factory that change training only (timm's
    ``drop_path_rate``).

    ``path`` may also be what a framework saved a patched model as: a Hugging Face ``save_pretrained``
    folder (the recipe is in its config.json), an ultralytics .pt (read as data, never unpickled: see
    ``attn_inject.integrations``); ``arch`` and ``num_classes`` then do not apply.
    """
    check_num_classes(num_classes)
    device = _device(map_location)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise AttnInjectError(f"dtype must be a floating-point torch.dtype, not {dtype!r}", hint="E.g. torch.float16.")
    if Path(path).is_dir() or Path(path).suffix != ".safetensors":
        model = _load_framework_file(Path(path), device, dtype)
        if model is not None:
            return model
    header = file_header(path)
    recipe = patched_recipe(header)
    if header.content == "adapter":
        raise AttnInjectError(
            "the file is an adapter: it holds only the injected blocks",
            where=str(header.path),
            hint="Build the base model and call attn_inject.apply_adapter(model, path).",
        )
    build_arch = arch_to_build(recipe, arch, trust_remote_code, header.path)
    model = rebuild(
        recipe,
        build_arch,
        num_classes if num_classes is not None else recipe.num_classes,
        header,
        device,
        convert=dtype is not None,
        model_options=model_options,
    )
    remember_data(model, header.data)
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _device(map_location: str | torch.device) -> torch.device:
    try:
        return torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise AttnInjectError(
            f"map_location={map_location!r} is not a device ({one_line(exc)})", hint="E.g. 'cpu' or 'cuda:0'."
        ) from None


def rebuild(
    recipe: Recipe,
    arch: str,
    num_classes: int | None,
    header: Header,
    device: torch.device,
    convert: bool = False,
    tensors: Callable[[], dict[str, torch.Tensor]] | None = None,
    model_options: dict[str, Any] | None = None,
) -> nn.Module:
    """``arch`` with the recipe replayed, holding the file's tensors (every key, strictly).

    The base weights' names, shapes and dtypes are compared with the model built on the meta device
    before any tensor is read; the injected blocks' after the replay, before they are loaded.
    ``tensors`` reads them (default: from ``header.path`` to ``device``; a framework's file read
    already gives them, with ``header_of`` them).
    """
    injected = set(recipe.modules)
    source = header.path
    read: dict[str, torch.Tensor] = {}

    def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
        target = model.state_dict()
        base = [k for k in header.shapes if not injected_key(k, injected)]
        known = set(base)
        missing = [k for k in target if k not in known]
        extra = [k for k in base if k not in target]
        problem = (
            (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}", ARCH_HINT)
            if missing or extra
            else misfit(header, target, target, convert, ARCH_HINT)
        )
        if problem:
            raise AttnInjectError(
                f"the file's weights do not fit {type(model).__name__}: {problem[0]}",
                where=str(source),
                hint=problem[1],
            )
        check_replayable(recipe, model, str(source))
        read.update(read_tensors(source, device) if tensors is None else tensors())
        check_finite(read, source)
        return {k: read[k] for k in base}

    model = model_holding(arch, num_classes, base_weights, model_options)
    replay(model, recipe, str(source))
    expected = model.state_dict()
    missing = [k for k in expected if k not in header.shapes]
    extra = [k for k in header.shapes if k not in expected]
    if missing or extra:
        raise AttnInjectError(
            f"the file does not hold what its recipe builds: missing {missing[:3]}, unexpected {extra[:3]}",
            where=str(source),
            hint=DAMAGED_HINT,
        )
    blocks = [k for k in expected if injected_key(k, injected)]
    problem = misfit(header, blocks, expected, convert, DAMAGED_HINT)
    if problem:
        raise AttnInjectError(
            f"the file does not hold what its recipe builds: {problem[0]}", where=str(source), hint=problem[1]
        )
    model.load_state_dict({k: read[k] for k in blocks}, strict=False)
    return model


def _load_framework_file(path: Path, device: torch.device, dtype: torch.dtype | None) -> nn.Module | None:
    """What a framework saved (None: no framework claims the path)."""
    for framework in FRAMEWORKS.values():
        model = framework.load_path(path, device, dtype)
        if model is not None:
            return model.eval()
    return None


def replay(model: nn.Module, recipe: Recipe, source: str) -> None:
    """Inject each of the recipe's injections into ``model``, checking each lands where it did."""
    with library_call():
        _replay(model, recipe, source)


def _replay(model: nn.Module, recipe: Recipe, source: str) -> None:
    check_replayable(recipe, model, source)
    for i, injection in enumerate(recipe.injections):
        inject(
            model,
            injection.block,
            list(injection.rules),
            include=injection.include,
            exclude=injection.exclude,
            position=injection.position,
            example_input=_example(model, injection.input_shapes),
            example_kwargs=_example_kwargs(model, injection.input_kwargs),
            verify=False,
            stack=injection.stack,
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


def check_replayable(recipe: Recipe, model: nn.Module, source: str, configured: tuple[int, ...] | None = None) -> None:
    """Refuse example inputs larger than a file may ask of ``model`` (its configured input size, or
    ``configured``: the size the model will have when ``load`` rebuilds it)."""
    configured = configured or configured_input_size(model)
    for i, injection in enumerate(recipe.injections):
        shapes = [*(injection.input_shapes or ()), *(shape for _, shape in injection.input_kwargs)]
        problem = example_shapes_problem(shapes, configured) if shapes else None
        if problem:
            raise AttnInjectError(
                f"injection {i} ({injection.block}) records the example input "
                f"{[list(s) for s in shapes]}: {problem}; a file may ask load() for no more",
                where=source,
                hint="inject() with a smaller example_input (e.g. one image of the model's size) to save the model.",
            )


def _example(model: nn.Module, shapes: tuple[tuple[int, ...], ...] | None) -> tuple | None:
    return None if shapes is None else seeded_tensors(shapes, *parameter_dtype_device(model))


def _example_kwargs(model: nn.Module, shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> dict[str, torch.Tensor]:
    """The example's keyword tensors, drawn as the positional ones are (seeded, the model's dtype)."""
    tensors = seeded_tensors([s for _, s in shapes], *parameter_dtype_device(model))
    return {name: t for (name, _), t in zip(shapes, tensors)}


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
    named = recipe.arch.startswith("torchvision:") or builder(recipe.arch) is not None  # names, not code
    if ":" in recipe.arch and not named and not trust_remote_code:
        raise AttnInjectError(
            f"the recipe names the factory {recipe.arch!r}, and a file is never allowed to import code",
            where=str(source),
            hint=f"If you trust it, pass arch={recipe.arch!r} (--arch) or trust_remote_code=True.",
        )
    return recipe.arch
