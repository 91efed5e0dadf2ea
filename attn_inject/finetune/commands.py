"""The ``eval`` and ``finetune`` commands: open a checkpoint, run the data through it, write the result.

A CKPT is a patched file (``save`` / ``attn-inject patch``, read with ``load``) or, with ``--arch``, a
plain checkpoint (read with ``checkpoint.load_pretrained``). Every check (paths, output, data,
head) runs before the first training step; the output is never the input and is replaced only with
``force`` (or when resuming the run that wrote it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AttnInjectError
from ..files.checkpoints import load_pretrained
from ..files.container import write_safetensors
from ..files.format import file_header, storable
from ..files.output import atomic_write, check_safetensors_output
from ..files.saving import load, save
from ..surgery.recipe import recipe_of, set_recipe
from . import distributed
from .data import SeededSamples, check_image_folder, data_config, head_size, image_folder, transforms
from .loop import Progress, TrainConfig, evaluate, finetune, val_loader


def open_model(path: str | Path, arch: str | None = None, num_classes: int | None = None) -> nn.Module:
    """A patched file with ``load`` (``arch`` overrides its recipe's); a plain checkpoint needs ``arch``."""
    if _is_patched(path):
        return load(path, arch)
    if arch is None:
        raise AttnInjectError(
            "a plain checkpoint (no attn_inject recipe inside)",
            where=str(path),
            hint="Name its architecture with --arch (a timm name, torchvision:NAME or package.module:factory).",
        )
    try:
        return load_pretrained(path, arch, num_classes=num_classes)
    except AttnInjectError:
        if num_classes is None:
            raise
        return load_pretrained(path, arch)  # the checkpoint's own head; finetune replaces it


def _is_patched(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix == ".safetensors" and path.is_file() and file_header(path).recipe is not None


def run_eval(
    checkpoint: str | Path,
    data: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str | None = None,
    bf16: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 and loss of a checkpoint on ``data/val`` (timm's eval transform for the model)."""
    info = check_image_folder(data, ("val",))
    context = distributed.setup(device)
    try:
        model = open_model(checkpoint, arch, num_classes)
        current = head_size(model)
        if current is not None and current != len(info.classes):
            raise AttnInjectError(
                f"the data has {len(info.classes)} classes but the model's head has {current} outputs",
                where=str(data),
                hint="Evaluate a model trained for these classes "
                f"(attn-inject finetune ... --num-classes {len(info.classes)}).",
            )
        model.to(context.device)
        cfg = data_config(model, img_size)
        val = SeededSamples(image_folder(data, "val"), transforms(cfg)[1])
        loader = val_loader(val, context, batch_size, workers)
        metrics = evaluate(model, loader, context, bf16=bf16, progress=progress, description="eval")
    finally:
        distributed.teardown(context)
    return {
        **dataclasses.asdict(metrics),
        "checkpoint": str(checkpoint),
        "classes": len(info.classes),
        "input_size": list(cfg["input_size"]),
        "is_main": context.is_main,
    }


def run_finetune(
    checkpoint: str | Path,
    data: str | Path,
    output: str | Path,
    config: TrainConfig,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune a checkpoint on ``data`` and write the result to ``output`` (a patched file if the input was)."""
    out = check_safetensors_output(output, inputs=(checkpoint,), force=force or resume)
    config.check()
    context = distributed.setup(device)
    try:
        model = open_model(checkpoint, arch, num_classes)
        summary = finetune(
            model,
            data,
            config,
            output=out,
            save_model=save_model,
            num_classes=num_classes,
            resume=resume,
            context=context,
            progress=progress,
        )
    finally:
        distributed.teardown(context)
    return {**summary, "checkpoint": str(checkpoint), "is_main": context.is_main}


def save_model(model: nn.Module, path: Path) -> None:
    """A patched model as a patched file (its recipe updated to a replaced head); a plain one as plain weights."""
    recipe = recipe_of(model)
    if recipe is None:
        tensors = storable(model.state_dict())
        atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, {"format": "pt"}))
        return
    classes = head_size(model)
    if recipe.num_classes != classes and classes is not None:
        set_recipe(model, dataclasses.replace(recipe, num_classes=classes))
    with torch.no_grad():
        save(model, path, force=True)
