"""What leaving the model exactly as it was costs inject: time and memory of ``preserve.preserved``.

For each timm model (untrained, eval mode) the script times ``inject(model, "eca", after="residual")``
on a fresh model, alternating runs with ``preserved`` in place and with it replaced by a no-op, and
reports the medians. Memory: the tensors ``preserved`` copied (those the forwards wrote) against the
bytes a full copy of the state would take. A model whose blocks count their calls in a buffer
(``CountingBlock``) shows the copy-on-write at work.

    python -m benchmarks.preserve_cost                   # resnet18, resnet50, convnext_small, 5 runs
    python -m benchmarks.preserve_cost --models resnet18 --runs 2

Raw results go to ``benchmarks/results/preserve_cost.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import timm
import torch

import attn_inject.graph.preserve as preserve
import attn_inject.surgery.api as surgery
from attn_inject import inject
from benchmarks.results_file import loadavg, write_results

DEFAULT_JSON = Path(__file__).parent / "results" / "preserve_cost.json"


def _inject_seconds(make, use_preserved: bool) -> float:
    model = make()
    original = surgery.preserved
    if not use_preserved:
        surgery.preserved = lambda m: contextlib.nullcontext()
    try:
        t0 = time.perf_counter()
        inject(model, "eca", after="residual")
        return time.perf_counter() - t0
    finally:
        surgery.preserved = original


def _copied(make) -> tuple[int, int]:
    """(tensors, bytes) preserved copied during one inject."""
    saved: list = []
    original = preserve._CopyOnWrite._save

    def counting(self, written):
        before = dict(self.saved)
        original(self, written)
        saved.extend(v for k, v in self.saved.items() if k not in before)

    preserve._CopyOnWrite._save = counting
    try:
        inject(make(), "eca", after="residual")
    finally:
        preserve._CopyOnWrite._save = original
    return len(saved), sum(old.numel() * old.element_size() for _, old in saved)


def _count_call(module, args) -> None:
    module.calls.add_(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "convnext_small"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"raw results (default {DEFAULT_JSON})")
    args = parser.parse_args()
    torch.set_num_threads(2)
    loadavg_before = loadavg()
    rows = []
    for name in args.models:

        def make(name=name):
            model = timm.create_model(name, pretrained=False).eval()
            for m in model.modules():  # a call counter per block: what copy-on-write has to save
                if type(m).__name__ in ("BasicBlock", "Bottleneck", "ConvNeXtBlock"):
                    m.register_buffer("calls", torch.zeros((), dtype=torch.long))
                    m.register_forward_pre_hook(_count_call)
            return model

        _inject_seconds(make, True)  # warm-up
        with_p, without = [], []
        for _ in range(args.runs):
            with_p.append(_inject_seconds(make, True))
            without.append(_inject_seconds(make, False))
        tensors, written = _copied(make)
        state = sum(t.numel() * t.element_size() for t in make().state_dict().values())
        rows.append(
            {
                "model": name,
                "inject_s_preserved": statistics.median(with_p),
                "inject_s_without": statistics.median(without),
                "copied_tensors": tensors,
                "copied_bytes": written,
                "full_copy_bytes": state,
            }
        )
    config = {
        "runs": args.runs,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg(),
    }
    write_results(args.json, {"config": config, "rows": rows}, print_report)


def print_report(result: dict) -> None:
    cfg = result["config"]
    print(
        f"torch {cfg['torch']}, timm {cfg['timm']}, {cfg['threads']} threads, median of {cfg['runs']} runs; "
        f"load average {cfg['loadavg_before']} -> {cfg['loadavg_after']}\n"
    )
    print(
        "| model | inject s, preserved | inject s, no-op | cost | tensors copied | bytes copied "
        "| full copy of the state |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        cost = r["inject_s_preserved"] / r["inject_s_without"] - 1
        print(
            f"| {r['model']} | {r['inject_s_preserved']:.3f} | {r['inject_s_without']:.3f} | {100 * cost:+.0f} % | "
            f"{r['copied_tensors']} | {r['copied_bytes']:,} | {r['full_copy_bytes'] / 1e6:.1f} MB |"
        )


if __name__ == "__main__":
    main()
