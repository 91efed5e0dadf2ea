"""The training state beside the output (``OUT-STEM.train-state.pt``), for ``--resume``.

Plain tensors, numbers, strings, lists and dicts only: written with ``torch.save`` through an
atomic write, read back with ``torch.load(weights_only=True)``, so nothing is ever unpickled as code.

It records every setting that changes the result (``TrainConfig.settings()``, the fingerprint of the
model's starting weights, the data's classes and image counts, the head size): a resumed run must
have the same ones, or name each one it changes in ``override``; then it ends with the same weights
as a run that was never interrupted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AttnInjectError
from ..files.container import create
from ..files.output import atomic_write
from ..safe_read import check_unpacks_within, is_plain_data

SUFFIX = ".train-state.pt"
NEEDED = ("model", "optimizer", "epochs_done", "step", "summary", "settings", "torch_rng")
HYPERPARAMETERS = ("lr", "initial_lr", "weight_decay")  # of each optimizer group: this run's, not the state's
# settings compared by a message of their own (they have no flag of the same name)
_SPECIAL = {
    "model": "the model's starting weights differ from the interrupted run's (fingerprint {new} vs {old})",
    "data": "the data differs from the interrupted run's ({new} vs {old})",
}


def state_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + SUFFIX)


def write_state(path: Path, state: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with create(tmp) as handle:  # through a Python file: a full disk is an OSError, not a C++ stream error
            torch.save(state, handle)

    atomic_write(path, write)


def read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AttnInjectError(
            "nothing to resume: no training state",
            where=str(path),
            hint="It is written after each epoch of a run with the same output; run without resume to start.",
            field="resume",
        )
    check_unpacks_within(path, "the training state")  # torch unpacks the whole archive
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AttnInjectError(f"cannot read the training state ({type(exc).__name__})", where=str(path)) from None
    if isinstance(state, dict) and "settings" not in state and "total_epochs" in state:
        raise AttnInjectError(
            "the training state was written by an older attn-inject, which did not record the run's settings",
            where=str(path),
            hint="Start the run again without resume.",
            field="resume",
        )
    if not isinstance(state, dict) or not set(NEEDED) <= set(state):
        raise AttnInjectError("not a training state written by attn-inject finetune", where=str(path))
    if not all(isinstance(state[k], dict) and is_plain_data(state[k]) for k in ("settings", "summary")):
        raise AttnInjectError(  # compared, shown and merged below: plain data of bounded size only
            "not a training state written by attn-inject finetune (its settings or summary are not plain data)",
            where=str(path),
        )
    return state


def compare_settings(previous: dict[str, Any], current: dict[str, Any], override: Iterable[str] = ()) -> list[str]:
    """Refuse the first setting that differs from the interrupted run's, unless named in ``override``.

    Returns the overridden settings that do differ (the run records the new values).
    """
    names = {name.replace("-", "_") for name in override}
    unknown = sorted(names - set(current))
    if unknown:
        raise AttnInjectError(
            f"override names no setting: {', '.join(unknown)}",
            hint=f"Settings a resumed run can change: {', '.join(sorted(current))}.",
        )
    changed = []
    for key, value in current.items():
        old = previous.get(key)
        if old == value:
            continue
        if key in names:
            changed.append(key)
            continue
        hint = f"Resume with the same {key}, or pass override=['{key}'] to change it."
        if key in _SPECIAL:
            raise AttnInjectError(_SPECIAL[key].format(new=_show(value), old=_show(old)), hint=hint)
        raise AttnInjectError(
            f"{key}={_show(value)} differs from the interrupted run's {_show(old)}", hint=hint, field=key
        )
    return changed


def check_state_fits(model: nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """The state's weights are this model's: the same names and shapes (else the first difference)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or extra or shapes:
        detail = (
            f"{shapes[0]} has shape {list(weights[shapes[0]].shape)} where the model's is {list(own[shapes[0]].shape)}"
            if shapes
            else f"{len(missing)} of the model's tensors missing (e.g. {missing[:2]}), {len(extra)} others "
            f"(e.g. {extra[:2]})"
        )
        raise AttnInjectError(
            f"the training state holds another model's weights: {detail}",
            where=str(where),
            hint="Resume with the checkpoint and options the run started with, or start again without resume.",
        )


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], where: Path) -> None:
    """The optimizer's moments and step counts from ``saved``; this run's learning rates and weight decay."""
    fresh = [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as exc:
        raise AttnInjectError(
            f"the training state's optimizer does not fit this run ({exc})",
            where=str(where),
            hint="Resume with the options the run started with, or start again without resume.",
        ) from None
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
