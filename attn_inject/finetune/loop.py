"""The training loop: AdamW and a cosine schedule from timm, evaluation, checkpoints and resume.

    result = finetune(model, "data/", TrainConfig(epochs=3), output=Path("out.safetensors"), save_model=save)

Evaluates before the first step and after every epoch; after each epoch, rank 0 writes the model
(``save_model``) and the training state beside it (``OUT.train-state.pt``: weights, optimizer,
scheduler, RNG, history), both atomically, so an interrupted run loses at most the current epoch
and ``resume=True`` continues from the last finished one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..errors import AttnInjectError
from . import distributed
from .data import SeededSamples, check_image_folder, data_config, fit_head, image_folder, transforms
from .params import (
    AttentionFirst,
    attention_parameter_names,
    classifier_path,
    param_groups,
    set_trainable,
    trainable_summary,
)
from .state import read_state, state_path, write_state

KEEP = ("last", "best")


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int = 32  # global: split evenly over the processes
    lr: float = 1e-4
    attention_lr: float | None = None  # default: lr
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    attention_only_steps: int = 0
    bf16: bool = False
    clip_grad: float | None = None
    seed: int = 0
    workers: int = 0
    img_size: int | None = None
    keep: str = "last"  # which epoch's weights the output holds
    train_transform: dict[str, Any] = field(default_factory=dict)  # extra timm create_transform options

    def check(self) -> None:
        """Every setting in range; the first that is not is an error naming the field."""
        for name, ok, rule in [
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "> 0"),
            ("workers", self.workers >= 0, ">= 0"),
            ("keep", self.keep in KEEP, f"one of {', '.join(KEEP)}"),
        ]:
            if not ok:
                raise AttnInjectError(f"{name} must be {rule}, got {getattr(self, name)}", field=name)


@dataclass(frozen=True)
class Metrics:
    top1: float  # fraction 0..1
    top5: float
    loss: float  # mean cross-entropy, no label smoothing
    images: int


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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``message`` says which checkpoint is intact and how to continue."""

    field = "resume"  # the setting the message names

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    context: distributed.Context,
    *,
    bf16: bool = False,
    progress: Progress | None = None,
    description: str = "eval",
) -> Metrics:
    """Top-1, top-5 and mean loss over the loader, summed over all ranks."""
    progress = progress or SilentProgress()
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = images = 0.0
    progress.start(description, len(loader))
    try:
        with torch.no_grad():
            for x, y in batches(loader):
                x, y = x.to(context.device), y.to(context.device)
                with _autocast(context, bf16):
                    logits = model(x)
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, y, reduction="none").double().sum().item()
                ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hits = ranked == y[:, None]
                top1 += hits[:, 0].sum().item()
                top5 += hits.any(dim=1).sum().item()
                images += len(y)
                progress.update(1)
    finally:
        progress.stop()
        model.train(was_training)
    loss_sum, top1, top5, images = distributed.all_sum([loss_sum, top1, top5, images], context)
    return Metrics(top1 / images, top5 / images, loss_sum / images, int(images))


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


def finetune(
    model: nn.Module,
    data: str | Path,
    config: TrainConfig,
    *,
    output: Path,
    save_model: Callable[[nn.Module, Path], None],
    num_classes: int | None = None,
    resume: bool = False,
    context: distributed.Context | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` on the ImageFolder ``data``; returns the summary (accuracy before, per epoch, after).

    ``save_model(model, path)`` writes the model file (atomically); it runs on rank 0 only.
    ``num_classes`` replaces a head that does not fit the data (only when given).
    """
    config.check()
    context = context or distributed.Context()
    progress = progress if progress is not None and context.is_main else SilentProgress()
    if config.batch_size % context.world_size:
        raise AttnInjectError(
            f"batch_size={config.batch_size} does not split over {context.world_size} processes",
            hint="The batch size is global: use a multiple of the number of processes.",
            field="batch_size",
        )
    if config.attention_only_steps and not attention_parameter_names(model):
        raise AttnInjectError(
            f"attention_only_steps needs injected attention blocks; {type(model).__name__} has none",
            hint="Patch the model first (inject, attn-inject patch), or leave out attention_only_steps.",
            field="attention_only_steps",
        )
    info = check_image_folder(data)
    previous = read_state(state_path(output)) if resume else None
    _seed_everything(config.seed)
    head_replaced = fit_head(model, len(info.classes), num_classes)
    model.to(context.device)

    cfg = data_config(model, config.img_size)
    train_tf, eval_tf = transforms(cfg, **config.train_transform)
    train_set = SeededSamples(image_folder(data, "train"), train_tf, config.seed)
    val_set = SeededSamples(image_folder(data, "val"), eval_tf, config.seed)
    per_rank = config.batch_size // context.world_size
    sampler: DistributedSampler = DistributedSampler(
        train_set, context.world_size, context.rank, shuffle=True, seed=config.seed
    )
    train_loader = DataLoader(train_set, per_rank, sampler=sampler, drop_last=True, num_workers=config.workers)
    validation = val_loader(val_set, context, per_rank, config.workers)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise AttnInjectError(
            f"train/ has {len(train_set)} images, fewer than one batch of {config.batch_size}",
            where=str(data),
            hint="Lower batch_size.",
            field="batch_size",
        )

    set_trainable(model, "all")
    optimizer, scheduler = _optimizer(model, config, steps_per_epoch * config.epochs)
    new_head = classifier_path(model) if head_replaced else None  # a new head trains from the first step
    schedule = AttentionFirst(model, config.attention_only_steps, also=[new_head] if new_head else ())
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    summary: dict[str, Any] = {
        "classes": len(info.classes),
        "train_images": info.counts["train"],
        "val_images": info.counts["val"],
        "head_replaced": head_replaced,
        "world_size": context.world_size,
        "steps_per_epoch": steps_per_epoch,
        "config": asdict(config),
        "output": str(output),
        "epochs": [],
    }
    start_epoch, step = 0, 0
    if previous is not None:
        start_epoch, step = _restore(previous, model, optimizer, scheduler, summary, info.classes, config)
        progress.note(f"resuming after epoch {start_epoch} of {config.epochs} (step {step})")
    else:
        summary["before"] = asdict(
            evaluate(model, validation, context, bf16=config.bf16, progress=progress, description="eval before")
        )
        progress.note(_metrics_line("before", summary["before"]))

    wrapped = model
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            model.train()
            progress.start(f"epoch {epoch + 1}/{config.epochs}", steps_per_epoch)
            loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
            for x, y in batches(train_loader):
                if schedule.update(step):  # the trainable set changed: DDP must sync the new set
                    del wrapped
                    wrapped = distributed.wrap(model, context)
                    progress.note(f"step {step}: training {schedule.phase} — {trainable_summary(model)}")
                scheduler.step_update(step)
                x, y = x.to(context.device), y.to(context.device)
                with _autocast(context, config.bf16):
                    loss = criterion(wrapped(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_grad:
                    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.clip_grad)
                optimizer.step()
                step += 1
                loss_sum += loss.item() * len(y)
                seen += len(y)
                progress.update(1, loss=loss.item(), img_s=seen * context.world_size / (time.perf_counter() - t0))
            progress.stop()
            seconds = time.perf_counter() - t0
            loss_sum, images = distributed.all_sum([loss_sum, seen], context)
            metrics = evaluate(model, validation, context, bf16=config.bf16, progress=progress, description="eval")
            record = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": loss_sum / images,
                **asdict(metrics),
                "images_per_s": images / seconds,
                "lr": optimizer.param_groups[0]["lr"],
            }
            summary["epochs"].append(record)
            progress.note(_metrics_line(f"epoch {epoch + 1}", record))
            best = max(summary["epochs"], key=lambda r: r["top1"])
            if context.is_main and (config.keep == "last" or best is record):
                save_model(model, output)
            if context.is_main:
                write_state(state_path(output), _state(model, optimizer, scheduler, summary, info.classes, step))
            distributed.barrier(context)
    except KeyboardInterrupt:
        done = len(summary["epochs"])
        kept = f"{output} holds epoch {done}" if done else f"nothing was written to {output}"
        raise TrainingInterrupted(
            f"interrupted during epoch {epoch + 1}; {kept}" + ("; continue with resume=True" if done else "")
        ) from None
    final = summary["epochs"][-1]
    chosen = final if config.keep == "last" else max(summary["epochs"], key=lambda r: r["top1"])
    summary["after"] = {k: final[k] for k in ("top1", "top5", "loss", "images")}
    summary["kept_epoch"] = chosen["epoch"]
    return summary


def _optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    groups = param_groups(model, config.lr, config.attention_lr, config.weight_decay)
    optimizer = create_optimizer_v2(groups, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total_steps,
        lr_min=config.min_lr,
        warmup_t=config.warmup_steps,
        warmup_lr_init=config.lr * 0.01,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return optimizer, scheduler


def _state(model, optimizer, scheduler, summary, classes, step) -> dict[str, Any]:
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epochs_done": len(summary["epochs"]),
        "step": step,
        "summary": {k: v for k, v in summary.items() if k in ("before", "epochs")},
        "classes": list(classes),
        "total_epochs": summary["config"]["epochs"],
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore(state, model, optimizer, scheduler, summary, classes, config) -> tuple[int, int]:
    if state["classes"] != list(classes):
        raise AttnInjectError(
            "the data's classes differ from the interrupted run's", hint="Resume with the same data.", field="data"
        )
    if state["total_epochs"] != config.epochs:
        raise AttnInjectError(
            f"epochs={config.epochs} differs from the interrupted run's {state['total_epochs']}",
            hint="Resume with the same epochs (the learning-rate schedule depends on it).",
            field="epochs",
        )
    if state["epochs_done"] >= config.epochs:
        raise AttnInjectError(f"the run already finished all {config.epochs} epochs; nothing to resume")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    summary.update(state["summary"])
    return state["epochs_done"], state["step"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(context: distributed.Context, bf16: bool):
    return torch.autocast(context.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _metrics_line(label: str, m: dict[str, Any]) -> str:
    extra = f" train loss {m['train_loss']:.4f} ·" if "train_loss" in m else ""
    speed = f" · {m['images_per_s']:.1f} img/s" if "images_per_s" in m else ""
    return f"{label}:{extra} val top1 {m['top1']:.2%} · top5 {m['top5']:.2%} · loss {m['loss']:.4f}{speed}"
