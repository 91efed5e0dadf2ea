"""Seconds and peak resident memory of one call (Linux: /proc/self/clear_refs resets the peak), with
the call's outcome: "works", or the first words of the AttnInjectError that refused it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attn_inject import AttnInjectError


def measured(run: Callable[[], Any], where: str = "") -> dict[str, Any]:
    """``run()`` timed, with the peak resident memory above what the process held before it."""
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    start = time.perf_counter()
    try:
        run()
        outcome = "works"
    except AttnInjectError as exc:
        outcome = "refused: " + (str(exc).split(where)[-1].lstrip(": ") if where else str(exc))[:120]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "outcome": outcome, "rss_before": before, "peak_rss": status("VmHWM")}


def status(key: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)
