"""The metrics file beside the output, ``OUT-STEM.metrics.jsonl``, and TensorBoard when it is installed.

One JSON object per line: ``{"kind": "epoch", ...}`` after every epoch (the numbers of the epoch
line: train loss, val top-1/top-5/loss, images/s, learning rate, and the EMA's when there is one) and
``{"kind": "step", ...}`` every ``log_interval`` optimizer steps (this process's mean train loss
over the interval, learning rate, images/s). Rank 0 writes; each row is flushed as it is written.
A resumed run drops the rows after the last finished epoch, so the file reads as one run.

TensorBoard (``tensorboard=FOLDER``) gets the same numbers through torch's ``SummaryWriter``; the
``tensorboard`` package is optional and not a dependency: without it the setting is refused before
training starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

from ..errors import AttnInjectError
from ..files.output import atomic_write

SUFFIX = ".metrics.jsonl"


def metrics_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + SUFFIX)


class MetricsLog:
    """Rows to ``path`` (JSON lines) and to TensorBoard; does nothing when not ``enabled`` (ranks > 0)."""

    def __init__(
        self, path: Path, *, enabled: bool = True, resume_after: int | None = None, tensorboard: str | None = None
    ):
        self.path = path
        self.enabled = enabled
        self.handle: IO[str] | None = None
        self.writer: Any = None
        if not enabled:
            return
        if tensorboard is not None:
            self.writer = _summary_writer(tensorboard)
        if resume_after is not None:
            self.handle = self._continue(resume_after)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.handle is None:
            self.handle = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - open for the run: a new file
        self.handle.write(json.dumps(_finite(row), allow_nan=False) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _continue(self, epochs_done: int) -> IO[str]:
        """Keep the rows up to ``epochs_done`` (an interrupted epoch's are dropped), then append."""
        kept = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= epochs_done:
                    kept.append(line)
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.path, lambda tmp: _write_text(tmp, text))
        return open(self.path, "a", encoding="utf-8")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _summary_writer(folder: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise AttnInjectError(
            f"tensorboard={folder} needs the TensorBoard package, which is not installed",
            hint="pip install TensorBoard, or leave out tensorboard (the metrics file has the same numbers).",
            field="tensorboard",
        ) from None
    return SummaryWriter(folder)


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
