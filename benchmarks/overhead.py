"""Runtime overhead of injected SE / ECA blocks against timm's hand-written models.

Pairs: ResNet-50 + SE injected after every bottleneck vs timm's ``seresnet50``, and ResNet-50-T +
ECA vs timm's ``ecaresnet50t``; each also against its plain base. All models are untrained
(random init), in eval mode, fp32, on the CPU with torch's default thread count. The script

* checks that each injected model has the same parameters as the hand-written one (count and
  shapes; whether the state_dict keys match is reported) and as its plan (``plan(...).params_added``);
* counts whole-model FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` at 1x3x224x224
  on the meta device (torch counts 2 FLOPs per multiply-add; it does not count GAP, sigmoid
  and the gating product, so the elements the blocks pool and scale are reported too);
* measures peak tensor memory of one forward (see ``PeakTensorMemory``);
* times forwards under ``torch.inference_mode``: warm-up, then repetitions that each run every
  model once, round-robin with a rotating start, so drift and other load hit all models alike.
  It reports the median latency per model and ratios of medians.

    python -m benchmarks.overhead                  # batch 1 and 8 at 224x224
    python -m benchmarks.overhead --quick          # batch 1 at 64x64, few repetitions (~10 s)
    python -m benchmarks.overhead --pairs se --json /tmp/overhead.json

Raw results (every timing) go to ``benchmarks/results/overhead.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from attn_inject import inject, list_blocks, plan
from attn_inject.blocks import get_block
from benchmarks.results_file import loadavg, write_results

# pair -> (base model, block, rule, timm's hand-written model)
PAIRS = {
    "se": ("resnet50", "se", "bottleneck", "seresnet50"),
    "eca": ("resnet50t", "eca", "bottleneck", "ecaresnet50t"),
    "eca-d": ("resnet50d", "eca", "bottleneck", "ecaresnet50d"),
}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time, all threads
FLOP_SIZE = 224
DEFAULT_JSON = Path(__file__).parent / "results" / "overhead.json"


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and alive at the same time.

    Every aten op's outputs are tracked by storage (views and in-place results count once) until
    the storage is freed. Storages that existed before (weights, buffers, the input) are ignored,
    and so is memory a kernel allocates outside tensors (oneDNN scratch) and allocator overhead.
    For a forward this is the activation memory: deterministic, unaffected by other processes.
    """

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key in self.existing or key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = (weakref.ref(storage, lambda _, k=key: self._free(k)), storage.nbytes())
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        _, nbytes = self.live.pop(key)
        self.current -= nbytes


def build_models(pairs: list[str], size: int) -> tuple[dict[str, dict], list[dict]]:
    """name -> {model, role, base, hand}; and one parameter check per pair."""
    models, checks = {}, []
    example = torch.randn(1, 3, size, size)
    for pair in pairs:
        base_name, block, rule, hand_name = PAIRS[pair]
        base = timm.create_model(base_name).eval()
        injected = timm.create_model(base_name).eval()
        the_plan = plan(injected, block, after=rule, example_input=example)
        inject(injected, block, after=rule, example_input=example)
        hand = timm.create_model(hand_name).eval()
        injected_name = f"{base_name}+{block}"
        models[base_name] = {"model": base, "role": "base", "base": base_name, "hand": None}
        models[injected_name] = {"model": injected, "role": "injected", "base": base_name, "hand": hand_name}
        models[hand_name] = {"model": hand, "role": "hand-written", "base": base_name, "hand": None}
        added = {name: n_params(models[name]["model"]) - n_params(base) for name in (injected_name, hand_name)}
        checks.append(
            {
                "pair": pair,
                "injected": injected_name,
                "hand_written": hand_name,
                "sites": len(the_plan.sites),
                "plan_params_added": the_plan.params_added,
                "plan_flops_added": the_plan.flops_added,
                "injected_params_added": added[injected_name],
                "hand_params_added": added[hand_name],
                "same_param_count": added[injected_name] == added[hand_name] == the_plan.params_added,
                "same_param_shapes": param_shapes(injected) == param_shapes(hand),
                "same_state_dict_keys": injected.state_dict().keys() == hand.state_dict().keys(),
            }
        )
    return models, checks


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in model.parameters())


def count_flops(model: torch.nn.Module) -> tuple[int, int]:
    """FLOPs of one 224x224 image, and the elements the injected blocks pool and scale (not counted).

    Runs a copy of the model on the meta device: shapes only, no arithmetic.
    """
    meta = copy.deepcopy(model).to("meta")
    block_types = tuple(get_block(name) for name in list_blocks())
    gated: list[int] = []
    for module in meta.modules():
        if isinstance(module, block_types):
            module.register_forward_pre_hook(lambda _, args: gated.append(args[0].numel()))
    with FlopCounterMode(display=False) as counter:
        meta(torch.empty(1, 3, FLOP_SIZE, FLOP_SIZE, device="meta"))
    return counter.get_total_flops(), sum(gated)


def peak_tensor_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.inference_mode():
        model(x)  # warm: lazily created state is not counted
        existing = [x, *model.parameters(), *model.buffers()]
        with PeakTensorMemory(existing) as tracker:
            model(x)
    return tracker.peak


def time_models(models: dict[str, torch.nn.Module], x: torch.Tensor, warmup: int, reps: int) -> dict[str, list[float]]:
    """Seconds per forward; each repetition runs every model once, starting one model later each time."""
    with torch.inference_mode():
        return time_calls({name: partial(model, x) for name, model in models.items()}, warmup, reps)


def time_calls(
    calls: dict[str, Callable[[], object]], warmup: int, reps: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Seconds per call on ``clock``; each repetition makes every call once, starting one call later each time."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for call in calls.values():
            call()
    for rep in range(reps):
        start = rep % len(names)
        for name in names[start:] + names[:start]:
            t0 = clock()
            calls[name]()
            times[name].append(clock() - t0)
    return times


def paired_ratio(times: list[float], reference: list[float], resamples: int = 2000) -> dict[str, Any]:
    """The median of the per-repetition ratios ``times[r] / reference[r]`` (both timed in the same
    round, so a slow spell of the machine slows both), with a 95 % bootstrap interval (seeded)."""
    ratios = [t / r for t, r in zip(times, reference)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {
        "median": statistics.median(ratios),
        "ci95": [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]],
    }


def latency_rows(models: dict[str, dict], times: dict[str, list[float]], peaks: dict[str, int]) -> list[dict]:
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, info in models.items():
        q1, _, q3 = statistics.quantiles(times[name], n=4)
        paired = paired_ratio(times[name], times[info["hand"]]) if info["hand"] else None
        rows.append(
            {
                "model": name,
                "role": info["role"],
                "median_ms": 1e3 * medians[name],
                "q1_ms": 1e3 * q1,
                "q3_ms": 1e3 * q3,
                "vs_base": medians[name] / medians[info["base"]],
                "vs_hand_written": medians[name] / medians[info["hand"]] if info["hand"] else None,
                "paired_vs_hand_written": paired,
                "peak_tensor_bytes": peaks[name],
                "times_ms": [1e3 * t for t in times[name]],
            }
        )
    return rows


def print_report(result: dict) -> None:
    cfg = result["config"]
    print(
        f"torch {cfg['torch']}, timm {cfg['timm']}, {cfg['threads']} threads, input {cfg['size']}x{cfg['size']}, "
        f"{cfg['reps']} interleaved repetitions after {cfg['warmup']} warm-up, load average {cfg['loadavg_before']} "
        f"-> {cfg['loadavg_after']}\n"
    )
    print("| model | params | + params vs base | GFLOPs (torch, 224) | + MFLOPs vs base | gated elements |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in result["models"].items():
        added = f"{s['params_added']:,}" if s["role"] != "base" else ""
        flops = f"{s['flops_added'] / 1e6:.2f}" if s["role"] != "base" else ""
        gated = f"{s['gated_elements']:,}" if s["gated_elements"] else ""
        print(f"| {name} | {s['params']:,} | {added} | {s['flops'] / 1e9:.3f} | {flops} | {gated} |")
    print()
    for c in result["checks"]:
        ok = c["same_param_count"] and c["same_param_shapes"]
        print(
            f"{'OK' if ok else 'MISMATCH'}: {c['injected']} adds {c['injected_params_added']:,} params at "
            f"{c['sites']} sites (plan: {c['plan_params_added']:,}), {c['hand_written']} adds "
            f"{c['hand_params_added']:,}; same parameter shapes: {c['same_param_shapes']}, "
            f"same state_dict keys: {c['same_state_dict_keys']}"
        )
    for batch, rows in result["latency"].items():
        print(f"\nbatch {batch}:\n")
        print("| model | median ms | IQR ms | × base | × hand-written | peak tensor MB |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            hand = f"{r['vs_hand_written']:.3f}" if r["vs_hand_written"] else ""
            base = f"{r['vs_base']:.3f}" if r["role"] != "base" else ""
            print(
                f"| {r['model']} | {r['median_ms']:.1f} | {r['q1_ms']:.1f}–{r['q3_ms']:.1f} | {base} | {hand} | "
                f"{r['peak_tensor_bytes'] / 2**20:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 at 64x64, 1 warm-up, 5 repetitions")
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["se", "eca"])
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8; --quick: 1)")
    parser.add_argument("--size", type=int, help="input height and width (default 224; --quick: 64)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 5; --quick: 1)")
    parser.add_argument("--reps", type=int, help="timed rounds (default 40; --quick: 5)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"raw results (default {DEFAULT_JSON})")
    args = parser.parse_args()
    batches = args.batches or ([1] if args.quick else [1, 8])
    size = args.size or (64 if args.quick else 224)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    reps = args.reps or (5 if args.quick else 40)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loadavg_before = loadavg()
    models, checks = build_models(args.pairs, size)
    params = {name: n_params(info["model"]) for name, info in models.items()}
    flops, gated = {}, {}
    for name, info in models.items():
        flops[name], gated[name] = count_flops(info["model"])
    stats = {
        name: {
            "role": info["role"],
            "params": params[name],
            "params_added": params[name] - params[info["base"]],
            "flops": flops[name],
            "flops_added": flops[name] - flops[info["base"]],
            "gated_elements": gated[name],
        }
        for name, info in models.items()
    }
    latency = {}
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        peaks = {name: peak_tensor_bytes(info["model"], x) for name, info in models.items()}
        times = time_models({name: info["model"] for name, info in models.items()}, x, warmup, reps)
        latency[str(batch)] = latency_rows(models, times, peaks)
    result = {
        "config": {
            "quick": args.quick,
            "pairs": args.pairs,
            "batches": batches,
            "size": size,
            "warmup": warmup,
            "reps": reps,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "loadavg_before": loadavg_before,
            "loadavg_after": loadavg(),
        },
        "models": stats,
        "checks": checks,
        "latency": latency,
    }
    write_results(args.json, result, print_report)


if __name__ == "__main__":
    main()
