"""Training cost per block: ResNet-50 + each injected block vs timm's hand-written ResNet-50 with it.

One training step (forward, backward, AdamW) per model, timed in interleaved repetitions
(``overhead.time_calls``), and the peak tensor memory of one step (``overhead.PeakTensorMemory``:
activations kept for backward and gradients; not weights or optimizer state), as the SE cost part
of ``benchmarks.finetune``. The hand-written twins are ``timm.create_model("resnet50",
block_args=dict(attn_layer=NAME))`` for cbam, gc, gca and coord (the injected blocks take their
layout options, ``init="paper"``, so shapes and parameter counts match); GCT, gather-excite and SimAM
have no timm twin that builds (timm 1.0.31's ``GatherExcite`` fails in its constructor) and are
compared with the plain ResNet-50 only.

    python -m benchmarks.block_cost                       # batch 8, 112x112, 10 repetitions
    python -m benchmarks.block_cost --size 64 --reps 3    # quicker

Results go to ``benchmarks/results/block_cost.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import timm
import torch

from attn_inject import inject

from .finetune import step_costs

DEFAULT_JSON = Path(__file__).parent / "results" / "block_cost.json"
# name: (block, options, timm's attn_layer or None)
BLOCKS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "cbam": ("cbam", {}, "cbam"),
    "gc": ("gc", {}, "gc"),
    "gca": ("gc", {"fuse_add": True, "fuse_scale": False}, "gca"),
    "coord": ("coord", {"rd_ratio": 1 / 16 * 2 / 3, "bias": False}, "coord"),
    "gct": ("gct", {}, None),
    "ge": ("ge", {}, None),
    "simam": ("simam", {}, None),
}


def build(names: list[str], size: int) -> dict[str, dict]:
    example = torch.randn(1, 3, size, size)
    models = {"resnet50": {"model": timm.create_model("resnet50"), "role": "base", "base": "resnet50", "hand": None}}
    for name in names:
        block, options, attn_layer = BLOCKS[name]
        hand_name = f"resnet50 attn_layer={attn_layer} (timm)" if attn_layer else None
        injected = inject(timm.create_model("resnet50"), block, after="bottleneck", example_input=example, **options)
        models[f"resnet50 + {name} (injected)"] = {
            "model": injected,
            "role": "injected",
            "base": "resnet50",
            "hand": hand_name,
        }
        if hand_name:
            hand = timm.create_model("resnet50", block_args=dict(attn_layer=attn_layer))
            models[hand_name] = {"model": hand, "role": "hand-written", "base": "resnet50", "hand": None}
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", nargs="+", choices=list(BLOCKS), default=list(BLOCKS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = build(args.blocks, args.size)
    load_before = os.getloadavg()[0]
    rows = step_costs(models, args.batch, args.size, args.warmup, args.reps)
    for row in rows:
        row["params"] = sum(p.numel() for p in models[row["model"]]["model"].parameters())
    config = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "size": args.size,
        "warmup": args.warmup,
        "reps": args.reps,
        "loadavg_before": round(load_before, 1),
        "loadavg_after": round(os.getloadavg()[0], 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    print(config)
    print("| model | params | median ms | IQR ms | x base | x hand-written | peak tensor MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hand = f"{r['vs_hand_written']:.3f}" if r["vs_hand_written"] else ""
        print(
            f"| {r['model']} | {r['params']:,} | {r['median_ms']:.1f} | {r['q1_ms']:.1f}–{r['q3_ms']:.1f} "
            f"| {r['vs_base']:.3f} | {hand} | {r['peak_tensor_bytes'] / 2**20:.2f} |"
        )


if __name__ == "__main__":
    main()
