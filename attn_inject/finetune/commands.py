"""The ``eval`` and ``finetune`` commands: open a checkpoint, run the data through it, write the result.

A CKPT is a file written by ``save`` / ``attn-inject patch`` / ``finetune`` (read with ``load``: a
patched model, or a plain one saved with its arch) or, with ``--arch``, a plain checkpoint (read with
``checkpoint.load_pretrained``). Every check (settings, paths, output, data, every image, head) runs
before the first training step; the output is never the input and is replaced only with ``force``
(or when resuming the run that wrote it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AttnInjectError
from ..files.checkpoints import load_pretrained
from ..files.format import file_header
from ..files.output import check_output, check_safetensors_output
from ..files.saving import load, save
from . import distributed
from .config import PRECISIONS, TrainConfig, check_loader_settings
from .confusion_plot import plot_confusion
from .data import SeededSamples, check_image_folder, check_img_size, data_config, head_size, image_folder, transforms
from .evaluation import Progress, evaluate_confusion, val_loader
from .loop import ema_path, finetune


def open_model(
    path: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    *,
    head_may_differ: bool = False,
    model_options: dict[str, Any] | None = None,
) -> nn.Module:
    """A file with a recipe with ``load`` (``arch`` overrides its recipe's); a plain checkpoint needs ``arch``.

    ``num_classes`` is the head to build; with ``head_may_differ`` (finetune, which replaces the head)
    a plain checkpoint whose head has another size is read with its own head.
    """
    if _has_recipe(path):
        if num_classes is not None and head_may_differ:
            return load(path, arch, model_options=model_options)  # its own head; finetune replaces it
        return load(path, arch, num_classes=num_classes, model_options=model_options)
    if arch is None:
        raise AttnInjectError(
            "a plain checkpoint (no attn_inject recipe inside)",
            where=str(path),
            hint="Name its architecture with --arch (a timm name, torchvision:NAME or package.module:factory).",
        )
    try:
        return load_pretrained(path, arch, num_classes=num_classes, model_options=model_options)
    except AttnInjectError:
        if num_classes is None or not head_may_differ:
            raise
        return load_pretrained(path, arch, model_options=model_options)


def _has_recipe(path: str | Path) -> bool:
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
    precision: str = "fp32",
    plot: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Top-1, top-5, loss, per-class accuracy and the confusion matrix of a checkpoint on ``data/val``
    (timm's eval transform for the model, at the size the file records unless ``img_size``);
    ``plot``: a PNG of the confusion matrix (refused if it exists, unless ``force``)."""
    check_loader_settings(batch_size, workers)
    if precision not in PRECISIONS:
        raise AttnInjectError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision}", field="precision")
    plot_path = None if plot is None else check_output(plot, inputs=(checkpoint,), force=force)
    if plot_path is not None and plot_path.suffix.lower() != ".png":
        raise AttnInjectError("the plot must be a .png file", where=str(plot_path), field="plot")
    check_img_size(img_size)
    context = distributed.setup(device)
    try:
        info = check_image_folder(data, ("val",), workers=workers, context=context, progress=progress)
        model = open_model(checkpoint, arch, num_classes)
        _check_classes(model, _file_classes(checkpoint), info.classes, data)
        model.to(context.device)
        cfg = data_config(model, img_size)
        val = SeededSamples(image_folder(data, "val"), transforms(cfg)[1])
        loader = val_loader(val, context, batch_size, workers)
        metrics, confusion = evaluate_confusion(
            model, loader, context, info.classes, autocast=PRECISIONS[precision], progress=progress
        )
    finally:
        distributed.teardown(context)
    if plot_path is not None and context.is_main:
        plot_confusion(confusion, plot_path, title=f"{Path(checkpoint).name} on {Path(data).name}/val")
    return {
        **dataclasses.asdict(metrics),
        "checkpoint": str(checkpoint),
        "classes": len(info.classes),
        "input_size": list(cfg["input_size"]),
        "per_class": confusion.per_class(),
        "confusion": {"classes": list(confusion.classes), "matrix": confusion.matrix},
        "plot": None if plot_path is None else str(plot_path),
        "is_main": context.is_main,
    }


def _file_classes(path: str | Path) -> tuple[str, ...] | None:
    """The class names a .safetensors file records (written by ``finetune`` or ``save``), if any."""
    path = Path(path)
    return file_header(path).data.classes if path.suffix == ".safetensors" and path.is_file() else None


def _check_classes(
    model: nn.Module, recorded: tuple[str, ...] | None, classes: tuple[str, ...], data: str | Path
) -> None:
    """The model's head fits the data: as many outputs as classes, and the names its file records."""
    current = head_size(model)
    if current is not None and current != len(classes):
        raise AttnInjectError(
            f"the data has {len(classes)} classes but the model's head has {current} outputs",
            where=str(data),
            hint=f"Evaluate a model trained for these classes (attn-inject finetune ... --num-classes {len(classes)}).",
        )
    if recorded is not None and len(recorded) == len(classes) and tuple(recorded) != tuple(classes):
        i = next(i for i, (a, b) in enumerate(zip(recorded, classes)) if a != b)
        raise AttnInjectError(
            f"the model was trained on other classes: its output {i} is {recorded[i]!r}, the data's class {i} is "
            f"{classes[i]!r}",
            where=str(data),
            hint="Evaluate on data with the class folders the model was trained on.",
        )


def run_finetune(
    checkpoint: str | Path,
    data: str | Path,
    output: str | Path,
    config: TrainConfig,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    resume: bool = False,
    override: tuple[str, ...] = (),
    force: bool = False,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune a checkpoint on ``data`` and write the result to ``output`` (with its recipe, data
    config and class names; a plain model as a plain model with its arch)."""
    config.check()
    out = check_safetensors_output(output, inputs=(checkpoint,), force=force or resume)
    if config.ema:
        check_safetensors_output(ema_path(out), inputs=(checkpoint,), force=force or resume)
    if override and not resume:
        raise AttnInjectError("override only applies to a resumed run", hint="Pass resume too.", field="resume")
    options = {"drop_path_rate": config.drop_path} if config.drop_path is not None else None
    context = distributed.setup(device)
    try:
        model = open_model(checkpoint, arch, num_classes, head_may_differ=True, model_options=options)
        summary = finetune(
            model,
            data,
            config,
            output=out,
            save_model=save_model,
            num_classes=num_classes,
            resume=resume,
            override=override,
            context=context,
            progress=progress,
        )
    finally:
        distributed.teardown(context)
    return {**summary, "checkpoint": str(checkpoint), "is_main": context.is_main}


def save_model(model: nn.Module, path: Path) -> None:
    """The model as a file ``load`` and ``eval`` read: its recipe (a plain model: just its arch),
    the head it has now, its data config and class names."""
    with torch.no_grad():
        save(model, path, force=True)
