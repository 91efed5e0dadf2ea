"""The training state beside the output (``OUT.train-state.pt``), for ``--resume``.

Plain tensors, numbers, strings, lists and dicts only: written with ``torch.save`` through an
atomic write, read back with ``torch.load(weights_only=True)``, so nothing is ever unpickled as code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import AttnInjectError
from ..files.container import create
from ..files.output import atomic_write

SUFFIX = ".train-state.pt"


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
            hint="It is written after each epoch of a run with the same --output; run without --resume to start.",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AttnInjectError(f"cannot read the training state ({type(exc).__name__})", where=str(path)) from None
    needed = {
        "model",
        "optimizer",
        "scheduler",
        "epochs_done",
        "step",
        "summary",
        "classes",
        "total_epochs",
        "torch_rng",
    }
    if not isinstance(state, dict) or not needed <= set(state):
        raise AttnInjectError("not a training state written by attn-inject finetune", where=str(path))
    return state
