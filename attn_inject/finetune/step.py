"""One optimizer step: ``grad_accum`` micro-batches through the model (autocast, timm's Mixup/CutMix,
DDP syncing only on the last), the loss checked finite on every process before its backward,
gradient clipping, the fp16 grad scaler, AdamW, and the EMA update.

The loss of each micro-batch is divided by the number of micro-batches in its step, so a step of
``grad_accum`` micro-batches of B images follows the gradient of one batch of ``grad_accum x B``
(without BatchNorm, whose statistics are per micro-batch). The last step of an epoch may have
fewer micro-batches, as in timm's train.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from . import distributed
from .config import TrainConfig
from .data import seeded
from .evaluation import autocast_context


class NonFiniteLoss(Exception):
    """The loss of a micro-batch was NaN or infinite (on some process); nothing was backpropagated."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss {value} at step {step}")
        self.step = step
        self.value = value


class Stepper:
    """Runs optimizer steps on ``model`` (the module whose parameters ``optimizer`` holds)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        context: distributed.Context,
        num_classes: int,
    ):
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.context = context
        self.mixup = (
            Mixup(
                mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix,
                cutmix_minmax=config.cutmix_minmax,
                prob=config.mixup_prob,
                switch_prob=config.mixup_switch_prob,
                mode=config.mixup_mode,
                label_smoothing=config.label_smoothing,
                num_classes=num_classes,
            )
            if config.mixes
            else None
        )
        self.criterion: nn.Module = (
            SoftTargetCrossEntropy() if self.mixup else nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        )
        self.scaler = torch.amp.GradScaler(context.device.type) if config.precision == "fp16" else None
        self.wrapped: nn.Module = model
        self.runner: Any = model

    def rewrap(self) -> None:
        """(Re)build the DDP wrapper (its synced parameters are those trainable now) and the compiled forward.

        Call it before the first step and whenever the set of trainable parameters changes."""
        self.wrapped = distributed.wrap(self.model, self.context)
        self.runner = torch.compile(self.wrapped) if self.config.compile else self.wrapped

    def step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> tuple[float, int]:
        """One optimizer step over ``micro_batches``; returns (sum of per-image losses, images) on this process."""
        config, context = self.config, self.context
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, images = 0.0, 0
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(context.device), y.to(context.device)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                with seeded(hash((config.seed, "mixup", step, i)) % 2**31):
                    x, y = self.mixup(x, y)
            last = i == len(micro_batches) - 1
            sync = nullcontext() if last or not context.distributed else self.wrapped.no_sync()  # type: ignore[operator]
            with sync:
                with autocast_context(context, config.autocast_dtype):
                    loss = self.criterion(self.runner(x), y)
                value = loss.item()
                if not _all_finite(value, context):
                    raise NonFiniteLoss(step, value)
                scaled = loss / len(micro_batches)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += value * len(x)
            images += len(x)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            if config.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(trainable, config.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if config.clip_grad:
                nn.utils.clip_grad_norm_(trainable, config.clip_grad)
            self.optimizer.step()
        return loss_sum, images


def groups_of(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    group: list[Any] = []
    for item in batches:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def steps_per_epoch(micro_batches: int, grad_accum: int) -> int:
    return math.ceil(micro_batches / grad_accum)


def _all_finite(value: float, context: distributed.Context) -> bool:
    """Whether the loss is finite on every process (a collective: all decide together)."""
    bad = 0.0 if math.isfinite(value) else 1.0
    return distributed.all_sum([bad], context)[0] == 0
