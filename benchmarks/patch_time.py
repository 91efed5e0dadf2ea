"""How long ``attn-inject patch`` takes, against reading, writing and running the same model once.

For a timm model (untrained weights saved as a plain ``.pth`` state_dict first, untimed) the script
times, per run:

- **baseline**: ``torch.load(weights_only=True)`` of the checkpoint + ``safetensors`` ``save_file``
  of the state_dict + one eager ``no_grad`` eval forward of the model (built outside the timing) on
  the example input (batch 1 at the model's configured size);
- **patch**: ``patch_checkpoint`` (what ``attn-inject patch`` runs) with ECA at the model's rule and
  ``--verify fast`` (the default), split into its phases (read, build, inject: the analysis, the
  reference forward, the splice and the verification forward; write; verify: the file read back);
  and the same with ``--verify full`` (which also rebuilds the model from the written file with
  ``load()`` and runs it and the patched model).

The goal is patch ≤ 2 × baseline. One untimed patch runs first (one-time process costs).

    .venv/bin/python -m benchmarks.patch_time                 # resnet50, 3 runs
    .venv/bin/python -m benchmarks.patch_time --quick         # resnet18, 1 run
    .venv/bin/python -m benchmarks.patch_time --models resnet50 resnet101 --runs 5 --threads 2

Raw results go to ``benchmarks/results/patch_time.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from attn_inject.files.patch import patch_checkpoint
from attn_inject.graph.example import example_args
from benchmarks.overhead import CLOCKS
from benchmarks.results_file import loadavg, write_results

MODELS = {
    "resnet18": "basic",
    "resnet50": "bottleneck",
    "resnet101": "bottleneck",
    "efficientnet_b0": "inverted_residual",
}
DEFAULT_MODELS = ["resnet50"]
QUICK_MODELS = ["resnet18"]
PHASES = ["read", "build", "inject", "write", "verify"]
DEFAULT_JSON = Path(__file__).parent / "results" / "patch_time.json"
_CLOCK = {"now": time.perf_counter}  # --clock: wall, or this process's CPU time (totals; phases are wall)


def clock() -> float:
    return _CLOCK["now"]()


def baseline(checkpoint: Path, out: Path, model: torch.nn.Module, args: tuple) -> dict[str, float]:
    t0 = clock()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    t1 = clock()
    save_file(state, str(out))
    t2 = clock()
    with torch.no_grad():
        model(*args)
    t3 = clock()
    out.unlink()
    return {"torch_load": t1 - t0, "save_file": t2 - t1, "forward": t3 - t2, "total": t3 - t0}


def patch(checkpoint: Path, out: Path, name: str, verify: str) -> dict[str, float]:
    t0 = clock()
    report = patch_checkpoint(checkpoint, name, "eca", MODELS[name], out, force=True, verify=verify)
    total = clock() - t0
    out.unlink()
    phases = dict(report.seconds)
    wall = _CLOCK["now"] is time.perf_counter  # the phases are wall time: "other" only on that clock
    phases["other"] = total - sum(phases.values()) if wall else 0.0
    return {"total": total, "sites": len(report.sites), "phases": phases}


def measure(name: str, runs: int, folder: Path) -> dict:
    model = timm.create_model(name).eval()
    checkpoint = folder / f"{name}.pth"
    torch.save(model.state_dict(), checkpoint)
    args = example_args(model)
    out = folder / "out.safetensors"
    base = [baseline(checkpoint, out, model, args) for _ in range(runs)]
    fast = [patch(checkpoint, out, name, "fast") for _ in range(runs)]
    full = [patch(checkpoint, out, name, "full") for _ in range(runs)]

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    row = {
        "model": name,
        "rule": MODELS[name],
        "sites": fast[0]["sites"],
        "input": list(args[0].shape),
        "params": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": checkpoint.stat().st_size,
        "baseline_s": med(base, "total"),
        "baseline_runs_s": [r["total"] for r in base],
        "baseline_parts_s": {k: statistics.median(r[k] for r in base) for k in ("torch_load", "save_file", "forward")},
        "patch_s": med(fast, "total"),
        "patch_runs_s": [r["total"] for r in fast],
        "patch_phases_s": {p: statistics.median(r["phases"].get(p, 0.0) for r in fast) for p in [*PHASES, "other"]},
        "patch_full_s": med(full, "total"),
        "patch_full_runs_s": [r["total"] for r in full],
        "patch_full_reload_s": statistics.median(r["phases"]["verify_full"] for r in full),
    }
    row["ratio"] = row["patch_s"] / row["baseline_s"]
    row["ratio_full"] = row["patch_full_s"] / row["baseline_s"]
    return row


def print_report(result: dict) -> None:
    cfg = result["config"]
    print(
        f"torch {cfg['torch']}, timm {cfg['timm']}, {cfg['threads']} threads, median of {cfg['runs']} runs; "
        f"load average {cfg['loadavg_before']} -> {cfg['loadavg_after']}\n"
    )
    print(
        "| model | rule | sites | baseline s (load + save + forward) | patch s (--verify fast) | × baseline | "
        "patch s (--verify full) | × baseline |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        parts = r["baseline_parts_s"]
        print(
            f"| {r['model']} | {r['rule']} | {r['sites']} | {r['baseline_s']:.3f} ({parts['torch_load']:.3f} + "
            f"{parts['save_file']:.3f} + {parts['forward']:.3f}) | {r['patch_s']:.3f} | {r['ratio']:.2f} | "
            f"{r['patch_full_s']:.3f} | {r['ratio_full']:.2f} |"
        )
    print("\nmedian seconds per phase of patch (--verify fast); full adds the rebuild from the file:\n")
    print("| model | " + " | ".join(PHASES) + " | other | full: rebuild + forward |")
    print("|---|" + "---:|" * (len(PHASES) + 2))
    for r in result["rows"]:
        ph = r["patch_phases_s"]
        print(
            f"| {r['model']} | "
            + " | ".join(f"{ph[p]:.3f}" for p in [*PHASES, "other"])
            + f" | {r['patch_full_reload_s']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)}, 1 run")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help=f"default: {', '.join(DEFAULT_MODELS)}")
    parser.add_argument("--runs", type=int, help="timed runs of each (default 3; --quick: 1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: totals in process CPU time (phases stay wall)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"raw results (default {DEFAULT_JSON})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _CLOCK["now"] = CLOCKS[args.clock]
    names = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    runs = args.runs or (1 if args.quick else 3)
    loadavg_before = loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        warm = timm.create_model("resnet18")
        torch.save(warm.state_dict(), folder / "warm.pth")
        patch_checkpoint(
            folder / "warm.pth", "resnet18", "eca", "basic", folder / "warm.safetensors", img_size=64
        )  # untimed
        rows = [measure(name, runs, folder) for name in names]
    result = {
        "config": {
            "quick": args.quick,
            "runs": runs,
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "loadavg_before": loadavg_before,
            "loadavg_after": loadavg(),
        },
        "rows": rows,
    }
    write_results(args.json, result, print_report)


if __name__ == "__main__":
    main()
