"""How long and how much memory a small hostile torch checkpoint makes ``attn-inject patch``'s and
``finetune --resume``'s readers take, against an honest checkpoint.

The readers: ``read_state_dict`` (a plain .pth), ``read_yolo_checkpoint`` (a .pt whose pickle names
ultralytics classes, read as data) and ``read_state`` (finetune's training state). The hostile files
(tests/helpers/hostile_checkpoints.py): a torch.save archive re-packed with deflated entries (256 MiB
of zeros in about 260 KB), pickles whose modules hold their child twice per level (2**20 and 2**40
paths to one Linear, about 6 and 11 KB), a module that holds itself, and a training state whose
settings hold a list along 2**40 paths. Each case runs in a fresh process, with a time limit: the
seconds, the peak resident memory above the process's before the read (/proc/self/clear_refs), and
the outcome ("works", "refused: ...", or "killed at the limit").

    .venv/bin/python -m benchmarks.hostile_checkpoints                # every case, 120 s limit each
    .venv/bin/python -m benchmarks.hostile_checkpoints --limit 30
    .venv/bin/python -m benchmarks.hostile_checkpoints --quick        # three cases, in this process

Raw results go to ``benchmarks/results/hostile_checkpoints.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

from attn_inject.files.checkpoints import read_state_dict
from attn_inject.finetune.state import read_state
from attn_inject.integrations.yolo_checkpoints import read_yolo_checkpoint
from benchmarks.peak_memory import measured
from benchmarks.results_file import loadavg, write_results
from tests.helpers.hostile_checkpoints import deflated, shared_list, shared_module_tree

DEFAULT_JSON = Path("benchmarks/results/hostile_checkpoints.json")
READERS: dict[str, Callable[[Path], Any]] = {
    "read_state_dict": read_state_dict,
    "read_yolo_checkpoint": read_yolo_checkpoint,
    "read_state": read_state,
}


def honest_pth(path: Path) -> Path:
    torch.save(timm.create_model("resnet18").state_dict(), path)
    return path


def bomb_pth(path: Path) -> Path:
    plain = path.with_name("zeros.pth")
    torch.save({"weight": torch.zeros(64 << 20)}, plain)
    deflated(plain, path)
    plain.unlink()
    return path


def state_file(path: Path) -> Path:
    state: dict[str, Any] = dict.fromkeys(("model", "optimizer", "epochs_done", "step", "torch_rng"), 0)
    state.update(summary={}, settings={"lr": 1e-4, "scale": shared_list(40)})
    torch.save(state, path)
    return path


# case -> (reader, the file it reads, made in a folder)
CASES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "plain .pth, timm resnet18 (honest)": ("read_state_dict", lambda d: honest_pth(d / "r18.pth")),
    "deflated .pth: 256 MiB of zeros": ("read_state_dict", lambda d: bomb_pth(d / "bomb.pth")),
    "ultralytics-named .pt, 2**4 paths to a Linear": (
        "read_yolo_checkpoint",
        lambda d: shared_module_tree(d / "dag4.pt", 4, ultralytics=True),
    ),
    "ultralytics-named .pt, 2**20 paths to a Linear": (
        "read_yolo_checkpoint",
        lambda d: shared_module_tree(d / "dag20.pt", 20, ultralytics=True),
    ),
    "ultralytics-named .pt, 2**40 paths to a Linear": (
        "read_yolo_checkpoint",
        lambda d: shared_module_tree(d / "dag40.pt", 40, ultralytics=True),
    ),
    "ultralytics-named .pt, a module holding itself": (
        "read_yolo_checkpoint",
        lambda d: shared_module_tree(d / "loop.pt", 0, ultralytics=True, itself=True),
    ),
    "training state, settings along 2**40 paths": ("read_state", lambda d: state_file(d / "x.train-state.pt")),
}


QUICK_CASES = [
    "plain .pth, timm resnet18 (honest)",
    "deflated .pth: 256 MiB of zeros",
    "ultralytics-named .pt, 2**40 paths to a Linear",
]


def measure(reader: str, path: Path, limit: float, fresh: bool = True) -> dict[str, Any]:
    """One read in a fresh process, killed after ``limit`` seconds (or in this one, without a limit)."""
    if not fresh:
        return measured(lambda: READERS[reader](path), str(path))
    argv = [sys.executable, "-m", "benchmarks.hostile_checkpoints", "--child", reader, str(path)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"seconds": limit, "outcome": f"killed at the limit ({limit:.0f} s)"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"outcome": "crashed: " + (lines[-1] if lines else f"exit {proc.returncode}")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_report(result: dict[str, Any]) -> None:
    print("| case | reader | file KB | seconds | peak above start MB | outcome |")
    print("|---|---|---:|---:|---:|---|")
    for case, row in result["cases"].items():
        mb = (row["peak_rss"] - row["rss_before"]) / 2**20 if "peak_rss" in row else float("nan")
        seconds = row.get("seconds", float("nan"))
        print(f"| {case} | {row['reader']} | {row['bytes'] / 1024:.1f} | {seconds:.2f} | {mb:.0f} | {row['outcome']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three cases, in this process (no time limit)")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds before a read is killed (default 120)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"raw results (default {DEFAULT_JSON})")
    parser.add_argument("--child", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        reader, path = args.child[0], Path(args.child[1])
        print(json.dumps(measure(reader, path, args.limit, fresh=False)))
        return
    before = loadavg()
    cases: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, (reader, make) in CASES.items():
            if args.quick and case not in QUICK_CASES:
                continue
            path = make(Path(tmp))
            found = measure(reader, path, args.limit, fresh=not args.quick)
            cases[case] = {"reader": reader, "bytes": path.stat().st_size, **found}
            print(f"{case}: {cases[case]['outcome']}", file=sys.stderr)
    result = {
        "config": {
            "quick": args.quick,
            "limit_s": args.limit,
            "torch": torch.__version__,
            "loadavg_before": before,
            "loadavg_after": loadavg(),
        },
        "cases": cases,
    }
    write_results(args.json, result, print_report)


if __name__ == "__main__":
    main()
