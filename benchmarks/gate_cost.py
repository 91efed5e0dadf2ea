"""The gate alone: forward + backward of one feature map, the library's gain-2 gate against timm's.

Forms, each on the same (B, C, H, W) map and (B, C, 1, 1) logits, interleaved (``overhead.time_calls``):

- ``timm``: ``x * sigmoid(z)``, timm's SE/ECA gate (plain autograd);
- ``addcmul (autograd)``: ``addcmul(x, x, tanh(z / 2))`` differentiated by autograd, the gate before
  issue 20 (what ``apply_gate`` still runs without a gradient);
- ``GainTwoGate``: ``apply_gate(x, z, 2.0)``, the same forward with its own backward.

Forward-only rows time the two forwards under no_grad.

``--se-stages``: the whole SE block instead (pool, fc1, ReLU, fc2, gate; forward + backward), the
library's ``se`` against timm's ``SEModule`` with the same reduced width, on the maps of ResNet-50's
four stages in a training step (batch 8, ``--size`` px input), and per step: each stage's median
times its number of blocks (3, 4, 6, 3), with the median of the per-repetition ratios.

    .venv/bin/python -m benchmarks.gate_cost --clock cpu --threads 1
    .venv/bin/python -m benchmarks.gate_cost --quick     # a 2x16x8x8 map, 3 repetitions
    .venv/bin/python -m benchmarks.gate_cost --se-stages --clock cpu --threads 1 --reps 60
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from timm.layers import SEModule

from attn_inject.blocks.gate import CENTRED, apply_gate
from attn_inject.blocks.se import SqueezeExcite
from benchmarks.overhead import CLOCKS, paired_ratio, time_calls
from benchmarks.results_file import loadavg, write_results

DEFAULT_JSON = Path(__file__).parent / "results" / "gate_cost.json"
SE_STAGES_JSON = Path(__file__).parent / "results" / "se_stages.json"


def forms(shape: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g)
    z0 = torch.randn(shape[0], shape[1], 1, 1, generator=g)
    grad = torch.randn(shape, generator=g)
    centred = CENTRED[torch.sigmoid].forward

    def backward_of(gate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def step() -> None:
            x, z = x0.detach().requires_grad_(), z0.detach().requires_grad_()
            gate(x, z).backward(grad)

        return step

    def forward_of(gate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def step() -> None:
            with torch.no_grad():
                gate(x0, z0)

        return step

    timm_gate = lambda x, z: x * torch.sigmoid(z)  # noqa: E731
    addcmul = lambda x, z: torch.addcmul(x, x, centred(z))  # noqa: E731
    ours = lambda x, z: apply_gate(x, z, 2.0)  # noqa: E731
    return {
        "timm x * sigmoid(z): forward + backward": backward_of(timm_gate),
        "addcmul (autograd): forward + backward": backward_of(addcmul),
        "GainTwoGate: forward + backward": backward_of(ours),
        "timm x * sigmoid(z): forward": forward_of(timm_gate),
        "addcmul: forward": forward_of(addcmul),
    }


STAGES = ((256, 4, 3), (512, 8, 4), (1024, 16, 6), (2048, 32, 3))  # ResNet-50: channels, stride, blocks


def se_stage_rows(batch: int, size: int, warmup: int, reps: int, clock: Callable[[], float]) -> list[dict]:
    """SE forward + backward, the library's block vs timm's, on each stage's map (interleaved)."""
    rows = []
    for channels, stride, blocks in STAGES:
        side = -(-size // stride)  # the stride-2 convs round up: 112 px gives 28, 14, 7 and 4
        shape = (batch, channels, side, side)
        g = torch.Generator().manual_seed(0)
        x0, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        ours, timm_se = SqueezeExcite(channels).train(), SEModule(channels, rd_ratio=1 / 16).train()
        assert ours.fc1.weight.shape == timm_se.fc1.weight.shape  # the same reduced width

        def step(block: torch.nn.Module, x0: torch.Tensor = x0, grad: torch.Tensor = grad) -> Callable[[], None]:
            return lambda: block(x0.detach().requires_grad_()).backward(grad)

        times = time_calls({"timm": step(timm_se), "attn_inject": step(ours)}, warmup, reps, clock)
        paired = paired_ratio(times["attn_inject"], times["timm"])
        rows.append(
            {
                "shape": list(shape),
                "blocks": blocks,
                "timm_ms": 1e3 * statistics.median(times["timm"]),
                "attn_inject_ms": 1e3 * statistics.median(times["attn_inject"]),
                "paired": paired["median"],
                "paired_ci95": paired["ci95"],
            }
        )
    return rows


def print_report(result: dict) -> None:
    cfg = result["config"]
    if "se_stages" in result:
        print(f"SE block, forward + backward, {cfg['threads']} thread(s), {cfg['clock']} time, {cfg['reps']} reps\n")
        print("| map | blocks | timm ms | attn_inject ms | paired ratio |\n|---|---:|---:|---:|---:|")
        for r in result["se_stages"]:
            print(
                f"| {tuple(r['shape'])} | {r['blocks']} | {r['timm_ms']:.3f} | {r['attn_inject_ms']:.3f} | "
                f"{r['paired']:.3f} |"
            )
        timm_step = sum(r["blocks"] * r["timm_ms"] for r in result["se_stages"])
        ours_step = sum(r["blocks"] * r["attn_inject_ms"] for r in result["se_stages"])
        print(f"| per step (16 blocks) | | {timm_step:.2f} | {ours_step:.2f} | {ours_step / timm_step:.3f} |")
        return
    print(
        f"map {tuple(cfg['shape'])}, {cfg['threads']} thread(s), {cfg['clock']} time, {cfg['reps']} interleaved "
        f"repetitions; load average {cfg['loadavg_before']} -> {cfg['loadavg_after']}\n"
    )
    print("| form | median ms | IQR ms | × timm |\n|---|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['form']} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}–{r['q3_ms']:.2f} | {r['vs_timm']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2x16x8x8 map, 3 repetitions")
    parser.add_argument("--shape", type=int, nargs=4, help="the map (default 8 256 40 40; --quick: 2 16 8 8)")
    parser.add_argument("--reps", type=int, help="timed rounds (default 30; --quick: 3)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--se-stages", action="store_true", help="the whole SE block at ResNet-50's stage maps")
    parser.add_argument("--size", type=int, default=112, help="input size of --se-stages (default 112; --quick: 32)")
    parser.add_argument("--json", type=Path, help=f"raw results (default {DEFAULT_JSON}; --se-stages {SE_STAGES_JSON})")
    args = parser.parse_args()
    args.shape = args.shape or ([2, 16, 8, 8] if args.quick else [8, 256, 40, 40])
    args.reps = args.reps or (3 if args.quick else 30)
    if args.threads:
        torch.set_num_threads(args.threads)
    before = loadavg()
    config = {"reps": args.reps, "clock": args.clock, "threads": torch.get_num_threads(), "loadavg_before": before}
    if args.se_stages:
        batch, size = (2, 32) if args.quick else (8, args.size)
        rows = se_stage_rows(batch, size, 3, args.reps, CLOCKS[args.clock])
        config.update(batch=batch, size=size, loadavg_after=loadavg())
        write_results(args.json or SE_STAGES_JSON, {"config": config, "se_stages": rows}, print_report)
        return
    times = time_calls(forms(tuple(args.shape)), 3, args.reps, CLOCKS[args.clock])
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, t in times.items():
        q1, _, q3 = statistics.quantiles(t, n=4)
        timm_name = "timm x * sigmoid(z): " + name.split(": ")[1]
        rows.append(
            {
                "form": name,
                "median_ms": 1e3 * medians[name],
                "q1_ms": 1e3 * q1,
                "q3_ms": 1e3 * q3,
                "vs_timm": medians[name] / medians[timm_name],
            }
        )
    config.update(shape=args.shape, loadavg_after=loadavg())
    write_results(args.json or DEFAULT_JSON, {"config": config, "rows": rows}, print_report)


if __name__ == "__main__":
    main()
