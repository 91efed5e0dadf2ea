"""Forwards and subprocesses as the tests run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attn_inject import inject
from attn_inject.testing import blocks_not_run, move_off_identity

REPO = Path(__file__).resolve().parents[2]  # the repository root: benchmarks/, examples/, rules/


def outputs(model: nn.Module, *args: Any) -> Any:
    """The model's output without autograd (the mode is the model's own)."""
    with torch.no_grad():
        return model(*args)


def inject_exactly(model: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    """``inject(model, *args, **kwargs)``, then check: the output on ``x`` is bitwise the same, every
    block runs, and the blocks moved off their identity init change it."""
    before = outputs(model, x)
    inject(model, *args, **kwargs)
    assert torch.equal(outputs(model, x), before)
    assert blocks_not_run(model, x) == 0
    move_off_identity(model)
    assert not torch.equal(outputs(model, x), before)


def run_python(*args: str, timeout: float | None = None, env: dict[str, str] | None = None):
    """``python ARGS`` (this interpreter) from the repository root, so ``-m benchmarks.zoo``,
    ``-m attn_inject`` and ``tests.helpers`` factories import this checkout; output captured as text."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
