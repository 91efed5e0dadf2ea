"""The settings of a fine-tuning run (``TrainConfig``), each checked, and which of them a resumed run
must share with the run it continues.

Messages name settings by their field names (``lr``, ``batch_size``); the command line shows them as
its flags (``--lr``, ``--batch-size``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import AttnInjectError
from ..graph.example import MAX_SIDE

KEEP = ("last", "best")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXUP_MODES = ("batch", "pair", "elem")
MAX_SEED = 2**32 - 1  # NumPy's seeds stop here
# Settings that do not change the weights a run ends with: a resumed run may change them freely.
NOT_COMPARED = ("workers", "log_interval", "tensorboard")


@dataclass
class TrainConfig:
    """Everything that shapes a fine-tuning run. ``check()`` refuses a value out of range, naming it."""

    epochs: int
    batch_size: int = 32  # global: images per forward over all processes (x grad_accum per step)
    lr: float = 1e-4
    attention_lr: float | None = None  # default: lr
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    attention_only_steps: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast and a grad scaler; GPU only)
    clip_grad: float | None = None
    seed: int = 0
    workers: int = 0
    img_size: int | None = None
    keep: str = "last"  # which epoch's weights the output holds
    train_transform: dict[str, Any] = field(default_factory=dict)  # timm create_transform options (aa, re_prob, ...)
    grad_accum: int = 1  # micro-batches per optimizer step
    drop_path: float | None = None  # timm's drop_path_rate, given to the model when it is built
    ema: bool = False  # keep an exponential moving average of the weights (timm ModelEmaV3)
    ema_decay: float = 0.9998
    ema_warmup: bool = False
    mixup: float = 0.0  # timm Mixup: mixup alpha
    cutmix: float = 0.0  # cutmix alpha
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    sync_bn: bool = False  # BatchNorm statistics over all processes (under torchrun)
    channels_last: bool = False
    compile: bool = False  # torch.compile the training forward
    log_interval: int = 50  # a line (and a metrics row) every this many optimizer steps; 0: per epoch only
    tensorboard: str | None = None  # a folder for TensorBoard event files (needs the tensorboard package)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS.get(self.precision)

    @property
    def mixes(self) -> bool:
        """Whether timm's Mixup / CutMix runs on the batches."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def check(self) -> None:
        """Every setting in range; the first that is not is an error naming the field."""
        lr_top = self.lr if self.attention_lr is None else min(self.lr, self.attention_lr)
        for name, ok, rule in [
            ("epochs", _int(self.epochs) and self.epochs >= 1, "an integer >= 1"),
            ("batch_size", _int(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
            ("lr", _number(self.lr) and self.lr > 0, "a finite number > 0"),
            (
                "attention_lr",
                self.attention_lr is None or (_number(self.attention_lr) and self.attention_lr > 0),
                "a finite number > 0",
            ),
            ("min_lr", _number(self.min_lr) and self.min_lr >= 0, "a finite number >= 0"),
            ("min_lr", not _number(lr_top) or self.min_lr <= lr_top, f"at most the peak learning rate ({lr_top:g})"),
            ("weight_decay", _number(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("warmup_steps", _int(self.warmup_steps) and self.warmup_steps >= 0, "an integer >= 0"),
            ("label_smoothing", _number(self.label_smoothing) and 0 <= self.label_smoothing < 1, "in [0, 1)"),
            (
                "attention_only_steps",
                _int(self.attention_only_steps) and self.attention_only_steps >= 0,
                "an integer >= 0",
            ),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            (
                "clip_grad",
                self.clip_grad is None or (_number(self.clip_grad) and self.clip_grad > 0),
                "a finite number > 0",
            ),
            ("seed", _int(self.seed) and 0 <= self.seed <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
            ("workers", _int(self.workers) and self.workers >= 0, "an integer >= 0"),
            (
                "img_size",
                self.img_size is None or (_int(self.img_size) and 1 <= self.img_size <= MAX_SIDE),
                f"an integer in [1, {MAX_SIDE}]",
            ),
            ("keep", self.keep in KEEP, f"one of {', '.join(KEEP)}"),
            ("train_transform", isinstance(self.train_transform, dict), "a dict of timm create_transform options"),
            ("grad_accum", _int(self.grad_accum) and self.grad_accum >= 1, "an integer >= 1"),
            ("drop_path", self.drop_path is None or (_number(self.drop_path) and 0 <= self.drop_path < 1), "in [0, 1)"),
            ("ema_decay", _number(self.ema_decay) and 0 < self.ema_decay < 1, "in (0, 1)"),
            ("mixup", _number(self.mixup) and self.mixup >= 0, "a finite number >= 0"),
            ("cutmix", _number(self.cutmix) and self.cutmix >= 0, "a finite number >= 0"),
            (
                "cutmix_minmax",
                self.cutmix_minmax is None or _range(self.cutmix_minmax),
                "two numbers 0 < min < max <= 1",
            ),
            ("mixup_prob", _number(self.mixup_prob) and 0 <= self.mixup_prob <= 1, "in [0, 1]"),
            ("mixup_switch_prob", _number(self.mixup_switch_prob) and 0 <= self.mixup_switch_prob <= 1, "in [0, 1]"),
            ("mixup_mode", self.mixup_mode in MIXUP_MODES, f"one of {', '.join(MIXUP_MODES)}"),
            ("log_interval", _int(self.log_interval) and self.log_interval >= 0, "an integer >= 0"),
        ]:
            if not ok:
                raise AttnInjectError(f"{name} must be {rule}, got {getattr(self, name)}", field=name)

    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (JSON values)."""
        return {k: _plain(v) for k, v in asdict(self).items() if k not in NOT_COMPARED}


def check_loader_settings(batch_size: int, workers: int) -> None:
    """``batch_size`` and ``workers`` of an evaluation, as ``TrainConfig.check`` checks them."""
    if not (_int(batch_size) and batch_size >= 1):
        raise AttnInjectError(f"batch_size must be an integer >= 1, got {batch_size}", field="batch_size")
    if not (_int(workers) and workers >= 0):
        raise AttnInjectError(f"workers must be an integer >= 0, got {workers}", field="workers")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_number(v) for v in value)
        and 0 < value[0] < value[1] <= 1
    )


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (how the values read back from a training state)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    return value
