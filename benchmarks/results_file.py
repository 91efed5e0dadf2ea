"""What every benchmark script does with its results: the load average around the run, and the
raw results written as JSON, then the report printed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: timing on 2 shared cores depends on them."""
    return [round(v, 2) for v in os.getloadavg()]


def write_results(path: Path, result: dict[str, Any], print_report: Callable[[dict[str, Any]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print_report(result)
    print(f"\nraw results: {path}")
