"""The training loop: AdamW and a cosine schedule from timm, evaluation, checkpoints and resume.

    result = finetune(model, "data/", TrainConfig(epochs=3), output=Path("out.safetensors"), save_model=save)

Before the first step: every check (settings, data layout, every image decoded), then an evaluation.
After each epoch, rank 0 writes the model (``save_model``; the last epoch, or with ``keep="best"``
the best so far by val top-1, the starting model included), the EMA's weights beside it with
``ema=True``, a row of the metrics file and the training state (``OUT-STEM.train-state.pt``:
weights, optimizer, EMA, RNG, history, the run's settings), all atomically, so an interrupted run
loses at most the current epoch and ``resume=True`` continues from the last finished one. A
non-finite loss stops the run before its backward, naming the step; that epoch writes nothing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import AttnInjectError
from ..files.data_config import DataInfo, remember_data
from ..files.format import fingerprint
from . import distributed
from .config import KEEP, TrainConfig
from .data import SeededSamples, check_image_folder, data_config, fit_head, image_folder, transforms
from .evaluation import Metrics, Progress, SilentProgress, batches, evaluate, val_loader
from .kept import Track, cpu_copy
from .metrics_log import MetricsLog, metrics_path
from .params import (
    AttentionFirst,
    attention_parameter_names,
    classifier_path,
    param_groups,
    set_trainable,
    trainable_summary,
)
from .state import check_state_fits, compare_settings, read_state, restore_optimizer, state_path, write_state
from .step import NonFiniteLoss, Stepper, groups_of, steps_per_epoch
from .sync_bn import sync_batchnorm

__all__ = [
    "KEEP",
    "Metrics",
    "Progress",
    "SilentProgress",
    "TrainConfig",
    "TrainingInterrupted",
    "evaluate",
    "finetune",
]

EMA_SUFFIX = ".ema"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``message`` says which checkpoint is intact and how to continue."""

    field = "resume"  # the setting the message names

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def ema_path(output: str | Path) -> Path:
    """Where the EMA's weights go: ``OUT-STEM.ema.safetensors``."""
    output = Path(output)
    return output.with_name(output.stem + EMA_SUFFIX + output.suffix)


def finetune(
    model: nn.Module,
    data: str | Path,
    config: TrainConfig,
    *,
    output: Path,
    save_model: Callable[[nn.Module, Path], None],
    num_classes: int | None = None,
    resume: bool = False,
    override: Iterable[str] = (),
    context: distributed.Context | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` on the ImageFolder ``data``; returns the summary (accuracy before, per epoch, after).

    ``save_model(model, path)`` writes a model file (atomically); it runs on rank 0 only.
    ``num_classes`` replaces a head that does not fit the data (only when given). ``resume``
    continues the run that wrote ``output``, refusing any setting that differs from its unless
    named in ``override``. ``config.drop_path`` is given to a model when ``run_finetune`` builds it;
    a model passed here keeps the stochastic depth it was built with. The model is trained in place
    (with ``sync_bn`` under torchrun, its BatchNorm layers become synchronised ones).
    """
    config.check()
    context = context or distributed.Context()
    progress = progress if progress is not None and context.is_main else SilentProgress()
    _check_run(model, config, context)
    info = check_image_folder(data, workers=config.workers, context=context, progress=progress)
    previous = read_state(state_path(output)) if resume else None
    log = MetricsLog(
        metrics_path(output),
        enabled=context.is_main,
        resume_after=previous["epochs_done"] if previous else None,
        tensorboard=config.tensorboard,
    )
    try:
        run = _Run(model, data, config, info, output, context, progress, log)
        run.prepare(num_classes, previous, override)
        return run.train(save_model)
    finally:
        log.close()


def _check_run(model: nn.Module, config: TrainConfig, context: distributed.Context) -> None:
    """The settings that depend on the processes, the device or the model."""
    if config.batch_size % context.world_size:
        raise AttnInjectError(
            f"batch_size={config.batch_size} does not split over {context.world_size} processes",
            hint="The batch size is global: use a multiple of the number of processes.",
            field="batch_size",
        )
    if config.mixes and (config.batch_size // context.world_size) % 2:
        raise AttnInjectError(
            f"batch_size={config.batch_size} gives {config.batch_size // context.world_size} images per process; "
            "timm's Mixup/CutMix needs an even number",
            field="batch_size",
        )
    if config.precision == "fp16" and context.device.type != "cuda":
        raise AttnInjectError(
            "precision=fp16 needs a GPU (float16 autocast with a grad scaler)",
            hint="On the CPU use precision=bf16.",
            field="precision",
        )
    if config.attention_only_steps and not attention_parameter_names(model):
        raise AttnInjectError(
            f"attention_only_steps needs injected attention blocks; {type(model).__name__} has none",
            hint="Patch the model first (inject, attn-inject patch), or leave out attention_only_steps.",
            field="attention_only_steps",
        )


class _Run:
    """One fine-tuning run: its data, optimizer, schedule, EMA, outputs and history (``summary``)."""

    def __init__(
        self,
        model: nn.Module,
        data: str | Path,
        config: TrainConfig,
        info: Any,
        output: Path,
        context: distributed.Context,
        progress: Progress,
        log: MetricsLog,
    ):
        self.model, self.data, self.config, self.info, self.output = model, data, config, info, output
        self.context, self.progress, self.log = context, progress, log
        self.eval_options: dict[str, Any] = {"autocast": config.autocast_dtype, "channels_last": config.channels_last}

    def prepare(self, num_classes: int | None, previous: dict[str, Any] | None, override: Iterable[str]) -> None:
        """Everything before the first step: head, data, settings (checked against a resumed run's),
        optimizer, schedule, EMA; the restored state or the evaluation before training."""
        config, context, info = self.config, self.context, self.info
        starting = fingerprint(self.model.state_dict())
        _seed_everything(config.seed)
        head_replaced = fit_head(self.model, len(info.classes), num_classes)
        self._data()
        self.settings = {
            **config.settings(),
            "model": f"{starting['structure']}/{starting['weights']}",
            "data": {"classes": list(info.classes), **{f"{k}_images": n for k, n in info.counts.items()}},
            "num_classes": num_classes,
        }
        overridden = compare_settings(previous["settings"], self.settings, override) if previous else []

        self.model.to(context.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        set_trainable(self.model, "all")
        self.optimizer, self.scheduler = _optimizer(self.model, config, self.per_epoch * config.epochs)
        self.ema = ModelEmaV3(self.model, decay=config.ema_decay, use_warmup=config.ema_warmup) if config.ema else None
        if config.sync_bn and context.distributed:
            self.model = sync_batchnorm(self.model, context)
        new_head = classifier_path(self.model) if head_replaced else None  # a new head trains from the first step
        self.schedule = AttentionFirst(self.model, config.attention_only_steps, also=[new_head] if new_head else ())
        self.stepper = Stepper(self.model, self.optimizer, config, context, len(info.classes))
        self.summary: dict[str, Any] = {
            "classes": len(info.classes),
            "train_images": info.counts["train"],
            "val_images": info.counts["val"],
            "head_replaced": head_replaced,
            "world_size": context.world_size,
            "steps_per_epoch": self.per_epoch,
            "config": asdict(config),
            "output": str(self.output),
            "epochs": [],
        }
        self.tracks = [Track("model", self.model, self.output, written=previous is not None)]
        if self.ema is not None:
            self.tracks.append(Track("ema", self.ema.module, ema_path(self.output), written=previous is not None))
            self.summary["ema_output"] = str(ema_path(self.output))
        self.start_epoch, self.step = 0, 0
        if previous is not None:
            self._restore(previous)
            note = f"resuming after epoch {self.start_epoch} of {config.epochs} (step {self.step})"
            self.progress.note(note + (f"; changed: {', '.join(overridden)}" if overridden else ""))
            self.summary["overridden"] = overridden
        else:
            self.summary["before"] = self._evaluate(self.model, "eval before")
            self.progress.note(_metrics_line("before", self.summary["before"]))
        self.starting_weights = cpu_copy(self.model) if config.keep == "best" and previous is None else None

    def _data(self) -> None:
        """The data config (remembered on the model: the output files carry it), datasets and loaders."""
        config, context = self.config, self.context
        cfg = data_config(self.model, config.img_size)
        remember_data(self.model, DataInfo(cfg, self.info.classes))
        train_tf, eval_tf = transforms(cfg, **config.train_transform)
        self.train_set = SeededSamples(image_folder(self.data, "train"), train_tf, config.seed)
        val_set = SeededSamples(image_folder(self.data, "val"), eval_tf, config.seed)
        per_rank = config.batch_size // context.world_size
        self.sampler: DistributedSampler = DistributedSampler(
            self.train_set, context.world_size, context.rank, shuffle=True, seed=config.seed
        )
        self.train_loader = DataLoader(
            self.train_set, per_rank, sampler=self.sampler, drop_last=True, num_workers=config.workers
        )
        self.validation = val_loader(val_set, context, per_rank, config.workers)
        if len(self.train_loader) == 0:
            raise AttnInjectError(
                f"train/ has {len(self.train_set)} images, fewer than one batch of {config.batch_size}",
                where=str(self.data),
                hint="Lower batch_size.",
                field="batch_size",
            )
        self.per_epoch = steps_per_epoch(len(self.train_loader), config.grad_accum)

    def train(self, save_model: Callable[[nn.Module, Path], None]) -> dict[str, Any]:
        """The epochs, each followed by its evaluation and writes; then the kept epochs in the summary."""
        epoch = self.start_epoch
        try:
            for epoch in range(self.start_epoch, self.config.epochs):
                record = self._epoch(epoch)
                self._end_epoch(record, save_model)
        except KeyboardInterrupt:
            done = len(self.summary["epochs"])
            kept = f"{self.output} holds epoch {done}" if done else f"nothing was written to {self.output}"
            raise TrainingInterrupted(
                f"interrupted during epoch {epoch + 1}; {kept}" + ("; continue with resume=True" if done else "")
            ) from None
        for track in self.tracks:
            record = track.kept(self.summary, self.config.keep)
            prefix = "" if track.name == "model" else f"{track.name}_"
            self.summary[f"{prefix}after"] = track.metrics(record)
            self.summary[f"{prefix}kept_epoch"] = record["epoch"]
        return self.summary

    def _epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of optimizer steps; its record (train loss, evaluation, speed, learning rate)."""
        config, context, progress = self.config, self.context, self.progress
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        self.model.train()
        progress.start(f"epoch {epoch + 1}/{config.epochs}", self.per_epoch)
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        interval = _Interval()
        for group in groups_of(batches(self.train_loader), config.grad_accum):
            if self.schedule.update(self.step):  # the trainable set changed: DDP must sync the new set
                self.stepper.rewrap()
                progress.note(f"step {self.step}: training {self.schedule.phase} — {trainable_summary(self.model)}")
            self.scheduler.step_update(self.step)
            try:
                group_loss, group_images = self.stepper.step(group, self.step)
            except NonFiniteLoss as exc:
                raise self._diverged(f"the training loss is {exc.value} at step {exc.step}", epoch) from None
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            self.step += 1
            loss_sum += group_loss
            seen += group_images
            interval.add(group_loss, group_images)
            rate = seen * context.world_size / (time.perf_counter() - t0)
            progress.update(1, loss=group_loss / group_images, img_s=rate)
            if config.log_interval and self.step % config.log_interval == 0:
                self._log_interval(epoch, interval.take())
        progress.stop()
        seconds = time.perf_counter() - t0
        for name, tensor in self.model.state_dict().items():  # a finite loss can still leave non-finite weights
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise self._diverged(f"{name} is not finite after step {self.step}", epoch)
        loss_sum, images = distributed.all_sum([loss_sum, seen], context)
        record = {
            "epoch": epoch + 1,
            "step": self.step,
            "train_loss": loss_sum / images,
            **self._evaluate(self.model, "eval"),
            "images_per_s": images / seconds,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if self.ema is not None:
            record.update({f"ema_{k}": v for k, v in self._evaluate(self.ema.module, "eval ema").items()})
        return record

    def _end_epoch(self, record: dict[str, Any], save_model: Callable[[nn.Module, Path], None]) -> None:
        """The epoch's line and, on rank 0, its files: the kept weights, the metrics row, the training state."""
        self.summary["epochs"].append(record)
        self.progress.note(_metrics_line(f"epoch {record['epoch']}", record))
        if self.context.is_main:
            for track in self.tracks:
                track.write(self.summary, self.config.keep, self.starting_weights, save_model)
            self.log.write({"kind": "epoch", **record})
            write_state(state_path(self.output), self._state())
        distributed.barrier(self.context)

    def _evaluate(self, module: nn.Module, description: str) -> dict[str, Any]:
        metrics = evaluate(
            module, self.validation, self.context, progress=self.progress, description=description, **self.eval_options
        )
        return asdict(metrics)

    def _log_interval(self, epoch: int, interval: tuple[float, int, float]) -> None:
        loss_sum, images, seconds = interval
        row = {
            "kind": "step",
            "epoch": epoch + 1,
            "step": self.step,
            "train_loss": loss_sum / images,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": images * self.context.world_size / seconds,
        }
        self.log.write(row)
        self.progress.note(
            f"epoch {epoch + 1}/{self.config.epochs} step {self.step}: train loss {row['train_loss']:.4f} · "
            f"lr {row['lr']:.3g} · {row['images_per_s']:.1f} img/s"
        )

    def _diverged(self, what: str, epoch: int) -> AttnInjectError:
        done = len(self.summary["epochs"])
        kept = f"nothing was written for epoch {epoch + 1} ({self.output} holds epoch {done})"
        return AttnInjectError(
            f"{what} (epoch {epoch + 1}): training diverged; {kept if done else 'nothing was written'}",
            hint="Lower lr (and the attention learning rate), or clip the gradient norm.",
            field="lr",
        )

    def _state(self) -> dict[str, Any]:
        state = {
            "model": cpu_copy(self.model),
            "optimizer": self.optimizer.state_dict(),
            "epochs_done": len(self.summary["epochs"]),
            "step": self.step,
            "summary": {k: v for k, v in self.summary.items() if k in ("before", "epochs")},
            "settings": self.settings,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        if self.ema is not None:
            state["ema"] = cpu_copy(self.ema.module)
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        where = state_path(self.output)
        if state["epochs_done"] >= self.config.epochs:
            raise AttnInjectError(
                f"the run already finished all {self.config.epochs} epochs; nothing to resume",
                hint="To train longer, pass more epochs and override=['epochs'].",
                field="epochs",
            )
        check_state_fits(self.model, state["model"], where)
        self.model.load_state_dict(state["model"])
        restore_optimizer(self.optimizer, state["optimizer"], where)
        if self.ema is not None:  # a run that had no EMA starts one from the restored weights
            self.ema.module.load_state_dict(state.get("ema", state["model"]))
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.summary.update(state["summary"])
        self.start_epoch, self.step = state["epochs_done"], state["step"]


class _Interval:
    """Train loss and images since the last ``log_interval`` line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.images, self.since = 0.0, 0, time.perf_counter()

    def add(self, loss_sum: float, images: int) -> None:
        self.loss_sum += loss_sum
        self.images += images

    def take(self) -> tuple[float, int, float]:
        """(loss sum, images, seconds) since the last take; starts the next interval."""
        taken = (self.loss_sum, self.images, time.perf_counter() - self.since)
        self.reset()
        return taken


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _metrics_line(label: str, m: dict[str, Any]) -> str:
    extra = f" train loss {m['train_loss']:.4f} ·" if "train_loss" in m else ""
    speed = f" · {m['images_per_s']:.1f} img/s" if "images_per_s" in m else ""
    ema = f" · EMA top1 {m['ema_top1']:.2%} · loss {m['ema_loss']:.4f}" if "ema_top1" in m else ""
    return f"{label}:{extra} val top1 {m['top1']:.2%} · top5 {m['top5']:.2%} · loss {m['loss']:.4f}{ema}{speed}"
