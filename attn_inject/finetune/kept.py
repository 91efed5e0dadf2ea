"""Which weights a run's files hold: the last epoch's, or with ``keep="best"`` the best so far by val
top-1, the starting model (epoch 0) included; for the model and, with EMA, for the EMA's weights
(each judged by its own accuracy)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

METRIC_KEYS = ("top1", "top5", "loss", "images")


@dataclass
class Track:
    """One set of weights the run writes: the model's (metrics at the record's top level) or the EMA's
    (metrics as ``ema_top1``, ...; at epoch 0 the EMA is the model)."""

    name: str
    module: nn.Module
    path: Path
    written: bool  # the file already holds one of this run's epochs

    def metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        prefix = "" if self.name == "model" or record["epoch"] == 0 else f"{self.name}_"
        return {k: record[prefix + k] for k in METRIC_KEYS}

    def kept(self, summary: dict[str, Any], keep: str) -> dict[str, Any]:
        """The record (epoch 0: the starting model) the track's file holds."""
        history = [{"epoch": 0, **summary["before"]}, *summary["epochs"]]
        if keep == "last":
            return history[-1]
        scores = [self.metrics(r)["top1"] for r in history]
        return history[scores.index(max(scores))]

    def write(
        self,
        summary: dict[str, Any],
        keep: str,
        starting_weights: dict[str, torch.Tensor] | None,
        save_model: Callable[[nn.Module, Path], None],
    ) -> None:
        """After an epoch: write the weights if this epoch is kept; the starting ones if they still are
        and the file does not hold them yet."""
        epoch = self.kept(summary, keep)["epoch"]
        if epoch == len(summary["epochs"]):
            save_model(self.module, self.path)
        elif epoch == 0 and not self.written and starting_weights is not None:
            with holding(self.module, starting_weights):
                save_model(self.module, self.path)
        else:
            return
        self.written = True


class holding:
    """``module`` holds ``weights`` inside the block, and exactly its own again after it."""

    def __init__(self, module: nn.Module, weights: dict[str, torch.Tensor]):
        self.module, self.weights = module, weights

    def __enter__(self) -> None:
        self.own = cpu_copy(self.module)
        self.module.load_state_dict(self.weights)

    def __exit__(self, *exc: Any) -> None:
        self.module.load_state_dict(self.own)


def cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict, copied to the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
