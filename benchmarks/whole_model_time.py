"""How long ``inject`` takes on whole detection models, in forward passes of the same model.

torchvision's Faster / Mask / Keypoint R-CNN (and RetinaNet, FCOS) are built untrained
(``weights=None, weights_backbone=None``: nothing is downloaded) and put in eval mode; the example
input is one 3xHxW image in a list, as the models take it. For each model the script times an
eager forward (median after a warm-up) and ``inject(model, "eca", after="residual")`` on a fresh
copy, split into inject's steps: the reference forward, the analysis (one example forward that
traces every module on the way), planning, splicing, the verification forward. It also counts
how many times the model's stem convolution ran during inject: the number of passes through the
backbone, independent of the machine's load.

    python -m benchmarks.whole_model_time             # the R-CNNs at 800 px, 3 runs
    python -m benchmarks.whole_model_time --quick     # Faster R-CNN MobileNetV3 320, 1 run

Raw results go to ``benchmarks/results/whole_model_time.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import time
from pathlib import Path
from typing import ClassVar

import torch
import torchvision
from torch import nn

from attn_inject import inject
from benchmarks.results_file import loadavg, write_results

MODELS = ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn"]
QUICK_MODELS = ["fasterrcnn_mobilenet_v3_large_320_fpn"]
STEPS = ["reference_forward", "analysis", "plan", "splice", "verify_forward"]
DEFAULT_JSON = Path(__file__).parent / "results" / "whole_model_time.json"

_surgery = importlib.import_module("attn_inject.surgery.api")


class Steps:
    """Times attn_inject's steps inside ``inject`` while active (wrappers for the benchmark only)."""

    TARGETS: ClassVar[dict[str, str]] = {
        "run": "forward",
        "analyze_shapes_first": "analysis",
        "build_plan": "plan",
        "splice": "splice",
    }

    def __enter__(self) -> Steps:
        self.calls: list[tuple[str, float]] = []
        self.saved = {name: getattr(_surgery, name) for name in self.TARGETS}
        for name, fn in self.saved.items():
            setattr(_surgery, name, self._timed(self.TARGETS[name], fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(_surgery, name, fn)

    def _timed(self, step, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.append((step, time.perf_counter() - t0))

        return timed

    def seconds(self) -> dict[str, float]:
        forwards = [s for n, s in self.calls if n == "forward"]  # the reference, then the verification
        out = {step: sum(s for n, s in self.calls if n == step) for step in ("analysis", "plan", "splice")}
        out["analysis"] -= forwards[0]  # the analysis runs the reference forward (graph/shapes.py)
        return {"reference_forward": forwards[0], **out, "verify_forward": forwards[1]}


def build(name: str) -> nn.Module:
    return getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None).eval()


def stem_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def forward_seconds(model: nn.Module, image: torch.Tensor, runs: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            model([image])
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def time_inject(model: nn.Module, image: torch.Tensor) -> dict:
    passes = []
    handle = stem_conv(model).register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        with Steps() as steps:
            t0 = time.perf_counter()
            # stack: every residual, as measured before places with the backbone's own SE were skipped
            inject(model, "eca", after="residual", example_input=([image],), stack=True)
            total = time.perf_counter() - t0
    finally:
        handle.remove()
    sites = sum(1 for n, _ in model.named_modules() if n.endswith(".eca") or n == "eca")
    return {"seconds": total, "steps_s": steps.seconds(), "stem_passes": len(passes), "sites": sites}


def measure(name: str, size: int, runs: int) -> dict:
    model = build(name)
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    forward = forward_seconds(model, image, runs)
    results = [time_inject(copy.deepcopy(model), image) for _ in range(runs)]
    totals = [r["seconds"] for r in results]
    steps = {s: statistics.median(r["steps_s"][s] for r in results) for s in STEPS}
    return {
        "model": name,
        "image": size,
        "forward_s": forward,
        "inject_s": statistics.median(totals),
        "runs_s": totals,
        "steps_s": steps,
        "stem_passes": results[0]["stem_passes"],
        "sites": results[0]["sites"],
        "inject_forwards": statistics.median(totals) / forward,
        "analysis_forwards": steps["analysis"] / forward,
    }


def print_report(result: dict) -> None:
    cfg = result["config"]
    print(
        f"torch {cfg['torch']}, torchvision {cfg['torchvision']}, {cfg['threads']} threads, "
        f"median of {cfg['runs']} runs; "
        f"load average {cfg['loadavg_before']} -> {cfg['loadavg_after']}\n"
    )
    print(
        "| model | image | sites | eager forward s | inject s | × forward | analysis s | analysis × forward | "
        "stem passes during inject |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(
            f"| {r['model']} | {r['image']} | {r['sites']} | {r['forward_s']:.2f} | {r['inject_s']:.2f} | "
            f"{r['inject_forwards']:.1f} | {r['steps_s']['analysis']:.2f} | {r['analysis_forwards']:.2f} | "
            f"{r['stem_passes']} |"
        )
    print("\nmedian seconds per step:\n")
    print("| model | " + " | ".join(STEPS) + " |")
    print("|---|" + "---:|" * len(STEPS))
    for r in result["rows"]:
        print(f"| {r['model']} | " + " | ".join(f"{r['steps_s'][s]:.2f}" for s in STEPS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MODELS[0]} at 320 px, 1 run")
    parser.add_argument("--models", nargs="+", choices=MODELS + QUICK_MODELS, help="default: the R-CNNs and RetinaNet")
    parser.add_argument("--runs", type=int, help="timed injects (and forwards) per model (default 3; --quick: 1)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 800; --quick: 320)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"raw results (default {DEFAULT_JSON})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or (QUICK_MODELS if args.quick else MODELS)
    runs = args.runs or (1 if args.quick else 3)
    size = args.size or (320 if args.quick else 800)
    loadavg_before = loadavg()
    rows = [measure(name, size, runs) for name in names]
    result = {
        "config": {
            "quick": args.quick,
            "runs": runs,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "loadavg_before": loadavg_before,
            "loadavg_after": loadavg(),
        },
        "rows": rows,
    }
    write_results(args.json, result, print_report)


if __name__ == "__main__":
    main()
