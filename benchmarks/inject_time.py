"""How long ``inject`` takes, and how that grows with model size.

For each timm model (untrained, built outside the timing) the script times
``inject(model, "eca", after=rule)`` for the generic ``residual`` rule and the model's natural rule
(``basic``, ``bottleneck``, ``inverted_residual``), on a fresh model each run, and reports the
median. Each run is split into inject's steps by timing wrappers put around attn_inject's internal
functions for the benchmark only: reference forward, tracing (``trace_module``, eval and train
mode, once per module structure), the rest of the analysis forward (the fx Interpreter run with
the real convolutions), planning, building blocks, splicing, the verification forward and the
comparison. An eager forward of the same model on the same example input (the model's configured
input size) is timed too. Least-squares lines through the ``residual`` rows (all models, and the ResNets alone) give
the seconds per site and per million parameters.

One untimed inject runs first, so one-time costs of the process (first convolutions, imports)
are not counted; with ``--cold`` (the default without ``--quick``) a fresh subprocess per model
measures the first inject, and the first forward, of a new process.

    python -m benchmarks.inject_time               # 8 models, 3 runs each, plus cold processes
    python -m benchmarks.inject_time --quick       # resnet18 and resnet34, residual rule, 2 runs
    python -m benchmarks.inject_time --models resnet50 --runs 5 --json /tmp/t.json

Raw results go to ``benchmarks/results/inject_time.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import timm
import torch

from attn_inject import inject, plan
from attn_inject.graph.example import example_args
from benchmarks.overhead import CLOCKS
from benchmarks.results_file import loadavg, write_results

# model -> its natural rule (None: only the generic "residual" rule applies)
MODELS = {
    "resnet18": "basic",
    "resnet34": "basic",
    "resnet50": "bottleneck",
    "resnet101": "bottleneck",
    "resnet152": "bottleneck",
    "convnext_small": None,
    "convnext_large": None,
    "efficientnet_b3": "inverted_residual",
}
QUICK_MODELS = ["resnet18", "resnet34"]
STACK = True  # efficientnet_b3 holds its own SE: a block beside it, as measured before such places were skipped
PHASES = ["reference_forward", "tracing", "interpreter", "plan", "blocks", "splice", "verify_forward", "compare"]
DEFAULT_JSON = Path(__file__).parent / "results" / "inject_time.json"
REPO = Path(__file__).resolve().parents[1]  # cold workers run as `python -m benchmarks.inject_time` from here

_CLOCK: dict = {"now": time.perf_counter, "name": "wall"}  # --clock: wall (perf_counter) or this process's CPU time


def clock() -> float:
    return _CLOCK["now"]()


_surgery = importlib.import_module("attn_inject.surgery.api")
_trace_cache = importlib.import_module("attn_inject.graph.trace_cache")


class Phases:
    """Wraps attn_inject's internal steps with timers while active; ``seconds()`` splits a run."""

    TARGETS: ClassVar[list[tuple[ModuleType, str]]] = [
        (_surgery, "run"),
        (_surgery, "analyze_shapes_first"),
        (_trace_cache, "trace_module"),
        (_surgery, "build_plan"),
        (_surgery, "_build_blocks"),
        (_surgery, "splice"),
        (_surgery, "first_difference"),
    ]

    def __enter__(self) -> Phases:
        self.calls: list[tuple[str, float]] = []
        self.sites = self.params = 0
        self.saved = [(module, name, getattr(module, name)) for module, name in self.TARGETS]
        for module, name, original in self.saved:
            setattr(module, name, self._timed(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in self.saved:
            setattr(module, name, original)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            t0 = clock()
            out = fn(*args, **kwargs)
            self.calls.append((name, clock() - t0))
            if name == "build_plan":
                self.sites, self.params = len(out.sites), out.params_before
            return out

        return timed

    def seconds(self, total: float) -> dict[str, float]:
        def spent(name: str) -> float:
            return sum(s for n, s in self.calls if n == name)

        forwards = [s for n, s in self.calls if n == "run"]  # the reference forward, then the verification
        out = {
            "reference_forward": forwards[0],
            "tracing": spent("trace_module"),
            # the analysis runs the reference forward too (graph/shapes.py)
            "interpreter": spent("analyze_shapes_first") - spent("trace_module") - forwards[0],
            "plan": spent("build_plan"),
            "blocks": spent("_build_blocks"),
            "splice": spent("splice"),
            "verify_forward": forwards[1],
            "compare": spent("first_difference"),
        }
        out["other"] = total - sum(out.values())
        return out


def time_inject(name: str, rule: str) -> tuple[float, dict[str, float], Phases]:
    """(seconds, seconds per phase, the phases with sites and params) of one inject into a fresh model."""
    model = timm.create_model(name)
    with Phases() as phases:
        t0 = clock()
        inject(model, "eca", after=rule, stack=STACK)
        total = clock() - t0
    return total, phases.seconds(total), phases


def time_plan(name: str, rule: str) -> float:
    """Seconds of one plan() (the analysis and matching, no splice) of a fresh model."""
    model = timm.create_model(name)
    t0 = clock()
    plan(model, "eca", after=rule, stack=STACK)
    return clock() - t0


def time_forward(name: str, runs: int) -> float:
    """Median seconds of an eager no_grad eval forward on inject's default example input (after one warm-up)."""
    model = timm.create_model(name).eval()
    args = example_args(model)
    times = []
    with torch.no_grad():
        for _ in range(runs + 1):
            t0 = clock()
            model(*args)
            times.append(clock() - t0)
    return statistics.median(times[1:])


def cold_worker(name: str, rule: str, what: str) -> None:
    """In a fresh process: the seconds of the first inject, or of the first forward; printed as JSON."""
    model = timm.create_model(name)
    t0 = clock()
    if what == "inject":
        inject(model, "eca", after=rule, stack=STACK)
    else:
        with torch.no_grad():
            model.eval()(*example_args(model))
    print(json.dumps({"seconds": clock() - t0}))


def cold_seconds(name: str, rule: str, what: str) -> float:
    threads = str(torch.get_num_threads())
    cmd = [sys.executable, "-m", "benchmarks.inject_time", "--cold-worker", name, rule, what, "--threads", threads]
    cmd += ["--clock", _CLOCK["name"]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.splitlines()[-1])["seconds"]


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line y = intercept + slope * x, and its R²."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return {"slope": slope, "intercept": intercept, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def fits(rows: list[dict]) -> dict[str, dict]:
    """Lines through the residual-rule rows against sites and against parameters: all models, and the ResNets."""
    groups = {"all models": [r for r in rows if r["rule"] == "residual"]}
    groups["ResNets"] = [r for r in groups["all models"] if r["model"].startswith("resnet")]
    out = {}
    for group, rs in groups.items():
        if len(rs) > 2:
            seconds = [r["median_s"] for r in rs]
            out[f"{group}, sites"] = fit([r["sites"] for r in rs], seconds)
            out[f"{group}, M params"] = fit([r["params"] / 1e6 for r in rs], seconds)
    return out


def measure(name: str, rule: str, runs: int, cold: bool, forward_s: float) -> dict:
    results = [time_inject(name, rule) for _ in range(runs)]
    plans = [time_plan(name, rule) for _ in range(runs)]
    totals = [total for total, _, _ in results]
    row = {
        "model": name,
        "rule": rule,
        "params": results[0][2].params,
        "sites": results[0][2].sites,
        "forward_s": forward_s,
        "median_s": statistics.median(totals),
        "runs_s": totals,
        "plan_s": statistics.median(plans),
        "plan_runs_s": plans,
        "phases_s": {p: statistics.median(r[1][p] for r in results) for p in [*PHASES, "other"]},
    }
    if cold:
        row["cold_inject_s"] = cold_seconds(name, rule, "inject")
    return row


def print_report(result: dict) -> None:
    cfg = result["config"]
    print(
        f"torch {cfg['torch']}, timm {cfg['timm']}, {cfg['threads']} threads, {cfg.get('clock', 'wall')} time, "
        f"median of {cfg['runs']} runs; "
        f"load average {cfg['loadavg_before']} -> {cfg['loadavg_after']}\n"
    )
    cold = cfg["cold"]
    print(
        "| model | rule | params (M) | sites | inject s (median) | runs s | eager forward s | × forward | "
        "ms per site | plan s (median) | plan × forward" + (" | cold inject s | cold forward s" if cold else "") + " |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:" + ("|---:|---:" if cold else "") + "|")
    for r in result["rows"]:
        forward = r["forward_s"]
        runs = ", ".join(f"{s:.2f}" for s in r["runs_s"])
        line = (
            f"| {r['model']} | {r['rule']} | {r['params'] / 1e6:.1f} | {r['sites']} | {r['median_s']:.3f} | {runs} | "
            f"{forward:.3f} | {r['median_s'] / forward:.2f} | {1e3 * r['median_s'] / r['sites']:.1f} | "
            f"{r['plan_s']:.3f} | {r['plan_s'] / forward:.2f}"
        )
        if cold:
            line += f" | {r['cold_inject_s']:.2f} | {result['cold_forward_s'][r['model']]:.2f}"
        print(line + " |")
    print("\nmedian seconds per step:\n")
    print("| model | rule | " + " | ".join(PHASES) + " | other |")
    print("|---|---|" + "---:|" * (len(PHASES) + 1))
    for r in result["rows"]:
        print(
            f"| {r['model']} | {r['rule']} | "
            + " | ".join(f"{r['phases_s'][p]:.3f}" for p in [*PHASES, "other"])
            + " |"
        )
    if result["fits"]:
        print("\nleast squares over the residual-rule rows, inject seconds = intercept + slope × x:\n")
        print("| rows, x | intercept s | slope s | R² |\n|---|---:|---:|---:|")
    for key, f in result["fits"].items():
        print(f"| {key} | {f['intercept']:.3f} | {f['slope']:.4f} | {f['r2']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{' and '.join(QUICK_MODELS)}, residual rule only, 2 runs"
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all (--quick: two small ones)")
    parser.add_argument("--runs", type=int, help="timed injects per model and rule (default 3; --quick: 2)")
    parser.add_argument(
        "--cold", action=argparse.BooleanOptionalAction, help="fresh-process timings (default: on unless --quick)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads, also in --cold processes (default: torch's own)"
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time, steadier on a shared machine"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"raw results (default {DEFAULT_JSON})")
    parser.add_argument("--cold-worker", nargs=3, metavar=("MODEL", "RULE", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _CLOCK.update(now=CLOCKS[args.clock], name=args.clock)
    if args.cold_worker:
        cold_worker(*args.cold_worker)
        return
    names = args.models or (QUICK_MODELS if args.quick else list(MODELS))
    runs = args.runs or (2 if args.quick else 3)
    cold = not args.quick if args.cold is None else args.cold

    loadavg_before = loadavg()
    inject(timm.create_model("resnet18"), "eca", after="residual")  # one-time process costs, untimed
    rows = []
    for name in names:
        rules = ["residual"] + ([MODELS[name]] if MODELS[name] and not args.quick else [])
        forward_s = time_forward(name, runs)
        rows += [measure(name, rule, runs, cold, forward_s) for rule in rules]
    result = {
        "config": {
            "quick": args.quick,
            "runs": runs,
            "cold": cold,
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "loadavg_before": loadavg_before,
        },
        "rows": rows,
        "cold_forward_s": {name: cold_seconds(name, "residual", "forward") for name in names} if cold else {},
        "fits": fits(rows),
    }
    result["config"]["loadavg_after"] = loadavg()
    write_results(args.json, result, print_report)


if __name__ == "__main__":
    main()
