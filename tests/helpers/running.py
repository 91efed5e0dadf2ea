"""Forwards and subprocesses as the tests run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]  # the repository root: benchmarks/, examples/, rules/


def outputs(model: nn.Module, *args: Any) -> Any:
    """The model's output without autograd (the mode is the model's own)."""
    with torch.no_grad():
        return model(*args)


def run_python(*args: str, timeout: float | None = None, env: dict[str, str] | None = None):
    """``python ARGS`` (this interpreter) from the repository root, so ``-m benchmarks.zoo``,
    ``-m attn_inject`` and ``tests.helpers`` factories import this checkout; output captured as text."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
