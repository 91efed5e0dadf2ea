"""Run the attn-inject CLI in this process, pausing at a named function so a test can kill it there.

    python -m tests.helpers.kill_at MODULE:FUNCTION MARKER ARGS...

Before its first call of MODULE:FUNCTION the process creates the file MARKER and sleeps (120 s at
most): the test waits for MARKER, then sends SIGTERM or SIGKILL, as ``timeout``, Slurm or the OOM
killer would, at a known point of the run.
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
from pathlib import Path

from attn_inject.cli import main


def pause_before(target: str, marker: Path) -> None:
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    @functools.wraps(original)
    def paused(*args, **kwargs):
        marker.touch()
        time.sleep(120)
        return original(*args, **kwargs)

    setattr(module, name, paused)


if __name__ == "__main__":
    target, marker, *argv = sys.argv[1:]
    pause_before(target, Path(marker))
    sys.exit(main(argv))
