"""Evaluation: top-1, top-5 and loss over a loader, summed over the processes; per-class accuracy and
the confusion matrix when asked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..errors import AttnInjectError
from . import distributed


@dataclass(frozen=True)
class Metrics:
    top1: float  # fraction 0..1
    top5: float
    loss: float  # mean cross-entropy, no label smoothing
    images: int


@dataclass(frozen=True)
class Confusion:
    """``matrix[true][predicted]`` image counts, with the class names in index order."""

    classes: tuple[str, ...]
    matrix: list[list[int]] = field(repr=False)

    def per_class(self) -> dict[str, float | None]:
        """Top-1 accuracy of each class (None for a class with no images)."""
        return {
            name: (row[i] / sum(row) if sum(row) else None)
            for i, (name, row) in enumerate(zip(self.classes, self.matrix))
        }


class Progress(Protocol):
    """Where the loops report: a phase of ``total`` steps starts, advances with fields (loss, img/s),
    stops; notes in between. The CLI passes a rich one; ``SilentProgress`` reports nothing."""

    def start(self, description: str, total: int) -> None: ...

    def update(self, advance: int = 1, **fields: float) -> None: ...

    def stop(self) -> None: ...

    def note(self, message: str) -> None: ...


class SilentProgress(Progress):
    """Reports nothing (the default, and what every rank but the first uses)."""

    def start(self, description: str, total: int) -> None:
        return None

    def update(self, advance: int = 1, **fields: float) -> None:
        return None

    def stop(self) -> None:
        return None

    def note(self, message: str) -> None:
        return None


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    context: distributed.Context,
    *,
    autocast: torch.dtype | None = None,
    progress: Progress | None = None,
    description: str = "eval",
    channels_last: bool = False,
) -> Metrics:
    """Top-1, top-5 and mean loss over the loader, summed over all ranks."""
    return _run(model, loader, context, autocast, progress, description, channels_last, None)[0]


def evaluate_confusion(
    model: nn.Module,
    loader: DataLoader,
    context: distributed.Context,
    classes: tuple[str, ...],
    *,
    autocast: torch.dtype | None = None,
    progress: Progress | None = None,
    description: str = "eval",
) -> tuple[Metrics, Confusion]:
    """``evaluate`` and the confusion matrix over ``classes`` (the model's outputs in order)."""
    metrics, matrix = _run(model, loader, context, autocast, progress, description, False, len(classes))
    assert matrix is not None
    return metrics, Confusion(tuple(classes), matrix.tolist())


def _run(
    model: nn.Module,
    loader: DataLoader,
    context: distributed.Context,
    autocast: torch.dtype | None,
    progress: Progress | None,
    description: str,
    channels_last: bool,
    num_classes: int | None,
) -> tuple[Metrics, torch.Tensor | None]:
    progress = progress or SilentProgress()
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = images = 0.0
    matrix = torch.zeros(num_classes**2, dtype=torch.float64) if num_classes else None
    progress.start(description, len(loader))
    try:
        with torch.no_grad():
            for x, y in batches(loader):
                x, y = x.to(context.device), y.to(context.device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast_context(context, autocast):
                    logits = model(x)
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, y, reduction="none").double().sum().item()
                ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hits = ranked == y[:, None]
                top1 += hits[:, 0].sum().item()
                top5 += hits.any(dim=1).sum().item()
                images += len(y)
                if matrix is not None and num_classes:
                    pairs = (y * num_classes + ranked[:, 0]).cpu()
                    matrix += torch.bincount(pairs, minlength=num_classes**2).double()
                progress.update(1)
    finally:
        progress.stop()
        model.train(was_training)
    loss_sum, top1, top5, images = distributed.all_sum([loss_sum, top1, top5, images], context)
    if matrix is not None and num_classes:
        matrix = torch.tensor(distributed.all_sum(matrix.tolist(), context)).round().long().view(num_classes, -1)
    return Metrics(top1 / images, top5 / images, loss_sum / images, int(images)), matrix


def autocast_context(context: distributed.Context, dtype: torch.dtype | None) -> Any:
    """torch's autocast to ``dtype`` on the context's device (nothing for fp32)."""
    return torch.autocast(context.device.type, dtype=dtype) if dtype is not None else nullcontext()


def batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches; an AttnInjectError raised in a loader worker comes back as its own one line."""
    try:
        yield from loader
    except AttnInjectError as exc:
        last = str(exc).strip().splitlines()[-1]  # torch re-raises it with the worker's traceback
        raise AttnInjectError(last.split("AttnInjectError: ", 1)[-1]) from None


def val_loader(dataset, context: distributed.Context, batch_size: int, workers: int = 0) -> DataLoader:
    """In order, each rank its own share (no padding: every image counts once when the sums are reduced)."""
    shard = Subset(dataset, range(context.rank, len(dataset), context.world_size))
    return DataLoader(shard, batch_size, num_workers=workers)
