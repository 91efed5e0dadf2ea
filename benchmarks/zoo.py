"""Zoo coverage: inject SE and ECA after "residual" into one model per timm family and every
torchvision classifier; record sites, bitwise identity, inject time and the reason for each miss.

    python -m benchmarks.zoo                 # the full sweep (about an hour on 2 cores)
    python -m benchmarks.zoo --quick         # three models, for the tests
    python -m benchmarks.zoo --only convnext resnet torchvision:resnet18 timm:repvgg_a0
    python -m benchmarks.zoo --third-party   # transformers models, torchvision detection/segmentation
    python -m benchmarks.zoo --quick --blocks cbam coord gc gct ge simam   # the other blocks

``timm:NAME`` is a timm family (its smallest model) or a timm model name. Places that already hold
channel attention are skipped as ``inject`` skips them by default, and counted; where every place
holds one, the blocks are stacked on them (``stack=True``) to test the surgery there. Where the
model folds branches (``reparameterize()`` & co.), ``timm.utils.reparameterize_model`` runs on the
patched model, blocks off identity: every block must be kept and run, and the output must stay
close to the unfolded one (read against how far 1e-6 input noise moves the unfolded one).

Each family runs in its own subprocess (a crash or a hang costs one family). For every model an
independent oracle counts the residual-looking adds at the dispatcher level (aten.add of two
same-shape tensors that both derive from the input), split by layout: NCHW when dims 2 and 3 are
equal (square input) and dim 1 differs, NHWC when dims 1 and 2 are equal and dim 3 differs. A family
"has an NCHW residual" when the oracle sees one; coverage is the share of those families patched
with bitwise identity.
Results: benchmarks/results/zoo.jsonl (one line per model) and a markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]  # the workers run as `python -m benchmarks.zoo` from here
QUICK = ["timm:resnet", "timm:convnext", "torchvision:mobilenet_v2"]
SMALL_INPUT = 96  # side of the square test image where the model accepts it
TIMEOUT = 900  # seconds per family
BLOCKS_VARIABLE = "ATTN_INJECT_ZOO_BLOCKS"  # --blocks, passed to the worker processes


# --------------------------------------------------------------------------------------------
# worker side: one family or one torchvision model, in its own process


def smallest_timm_model(family: str) -> str:
    """The family's model with the fewest parameters (counted on the meta device), skipping timm's
    test_* models where the family has others."""
    import timm
    import torch

    best = None
    names = timm.list_models(module=family)
    real = [n for n in names if not n.startswith("test_")]  # timm's tiny test models lack real blocks
    for name in real or names:
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in timm.create_model(name).parameters())
        except Exception:
            continue
        if best is None or n < best[0]:
            best = (n, name)
    if best is None:
        raise RuntimeError(f"no model of family {family} could be built")
    return best[1]


# Hugging Face transformers vision models, each from its default config: (model class, config class, config kwargs).
TRANSFORMERS = {
    "resnet": ("ResNetForImageClassification", "ResNetConfig", {}),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", {}),
    "regnet": ("RegNetForImageClassification", "RegNetConfig", {}),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config", {}),
    "mobilenet_v1": ("MobileNetV1ForImageClassification", "MobileNetV1Config", {}),
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig", {}),
    "bit": ("BitForImageClassification", "BitConfig", {}),
    "mobilevit": ("MobileViTForImageClassification", "MobileViTConfig", {}),
    # DPTConfig(is_hybrid=True) alone does not run (its neck sizes are the ViT's); these are DPT-hybrid-MiDaS's
    "dpt_hybrid": (
        "DPTForDepthEstimation",
        "DPTConfig",
        {"is_hybrid": True, "neck_hidden_sizes": [256, 512, 768, 768]},
    ),
}
DETECTION_SIZE = 224  # torchvision detection models resize every image to this side (default 800)


def detection_options(name: str) -> dict:
    """Smaller images, and every box kept whatever its score: an untrained detector finds no box
    above the default thresholds, and an empty output would hide any change."""
    if name.startswith("ssd"):
        return {"score_thresh": 0.0}
    sizes = {"min_size": DETECTION_SIZE, "max_size": DETECTION_SIZE}
    return {**sizes, "box_score_thresh": 0.0} if "rcnn" in name else {**sizes, "score_thresh": 0.0}


def build(spec: str):
    """(name, factory) for 'timm:FAMILY', 'torchvision:NAME' (classification, detection or
    segmentation; no weights, no backbone weights) or 'transformers:NAME' (TRANSFORMERS)."""
    kind, name = spec.split(":", 1)
    if kind == "timm":
        import timm

        model_name = name if name not in timm.list_modules() and timm.is_model(name) else smallest_timm_model(name)
        return model_name, lambda: timm.create_model(model_name, pretrained=False)
    if kind == "transformers":
        import transformers

        model_cls, config_cls, options = TRANSFORMERS[name]
        return model_cls, lambda: getattr(transformers, model_cls)(getattr(transformers, config_cls)(**options))
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models.detection):
        options = detection_options(name)
        return name, lambda: torchvision.models.get_model(name, weights=None, weights_backbone=None, **options)
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        return name, lambda: torchvision.models.get_model(name, weights=None, weights_backbone=None)
    return name, lambda: torchvision.models.get_model(name, weights=None)


def oracle_adds(model, x) -> dict[str, int]:
    """Count adds of two same-shape tensors that both derive from the input, by layout.

    Provenance is tracked at the dispatcher: a tensor derives from the input when an op that made
    it read the input or a tensor derived from it (so position embeddings, attention biases and
    other parameter-only sums are not counted).
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    adds = {"nchw": 0, "nhwc": 0, "other": 0}
    add_ops = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
    derived: dict[int, weakref.ref] = {id(x): weakref.ref(x)}  # by identity: tensors compare by value

    def is_derived(t) -> bool:
        ref = derived.get(id(t))
        return ref is not None and ref() is t

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if any(is_derived(t) for t in inputs):
                derived.update((id(t), weakref.ref(t)) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            if (
                func in add_ops
                and len(args) >= 2
                and all(isinstance(a, torch.Tensor) and is_derived(a) for a in args[:2])
            ):
                a, b = args[0], args[1]
                if a.shape == b.shape and a.dim() >= 3 and a.is_floating_point():
                    s = a.shape
                    if a.dim() == 4 and s[2] == s[3] and s[1] != s[2]:
                        adds["nchw"] += 1
                    elif a.dim() == 4 and s[1] == s[2] and s[3] != s[1]:
                        adds["nhwc"] += 1
                    else:
                        adds["other"] += 1
            return out

    with torch.no_grad(), Count():
        model(x)
    return adds


def test_input(model):
    """A 2-image batch at SMALL_INPUT where the model takes it, else at its configured size."""
    import torch

    cfg = getattr(model, "pretrained_cfg", None) or {}
    side = getattr(getattr(model, "config", None), "image_size", 224)  # transformers: the config's
    size = tuple(cfg.get("input_size", (3, side, side)))
    generator = torch.Generator().manual_seed(0)
    if not cfg.get("fixed_input_size", False):
        small = torch.randn(2, size[0], SMALL_INPUT, SMALL_INPUT, generator=generator)
        try:
            with torch.no_grad():
                model(small)
            return small
        except Exception:
            pass
    return torch.randn(2, *size, generator=generator)


def run_one(spec: str) -> dict:
    import torch

    from attn_inject import AttnInjectError, inject
    from attn_inject.finetune import attention_blocks
    from attn_inject.graph.example import first_difference
    from attn_inject.testing import blocks_not_run, calibrate_batch_norms, look_trained, move_off_identity

    torch.manual_seed(0)
    row: dict = {"spec": spec}
    try:
        name, factory = build(spec)
        row["model"] = name
        original = look_trained(factory())
    except Exception as exc:
        row["error"] = f"model not built: {type(exc).__name__}: {str(exc)[:200]}"
        return row
    row["params"] = sum(p.numel() for p in original.parameters())
    try:  # can plain torch.fx trace the whole model? (attn_inject does not need it to)
        torch.fx.symbolic_trace(copy.deepcopy(original))
        row["whole_model_fx"] = "ok"
    except Exception as exc:
        row["whole_model_fx"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    try:
        x = test_input(original)
        row["input"] = list(x.shape)
        row["norms_calibrated"] = calibrate_batch_norms(original, x)
        row["oracle"] = oracle_adds(original, x)
        with torch.no_grad():
            reference = original(x)
    except Exception as exc:
        row["error"] = f"model does not run: {type(exc).__name__}: {str(exc)[:200]}"
        return row
    for block in os.environ.get(BLOCKS_VARIABLE, "se,eca").split(","):
        model = copy.deepcopy(original)
        result: dict = {}
        try:
            rule, report = planned(model, block, x[:1])
            result["rule"] = rule
            result["untraced"] = [f"{p}: {r}" for p, r in report.untraced]
            result["misses"] = len(report.misses)
            result["attended"] = len(report.attended)  # skipped: they hold channel attention already
            result["folded"] = len(report.folded)
            stack = len(report.attended) == len(report)  # nothing else: stack, to test the surgery there
            result["stacked"] = stack
            start = time.perf_counter()
            inject(model, block, after=rule, example_input=x[:1], stack=stack)
            result["seconds"] = round(time.perf_counter() - start, 3)
            result["sites"] = len(attention_blocks(model))
            with torch.no_grad():
                result["identical"] = first_difference(reference, model(x)) is None
            result["not_run"] = blocks_not_run(model, x)  # blocks the forward never calls
            move_off_identity(model)
            with torch.no_grad():
                moved = model(x)
            result["moved_changes_output"] = first_difference(reference, moved) is not None
            if report.folded:
                result["reparameterized"] = reparameterized(model, x, moved)
        except AttnInjectError as exc:
            result["refused"] = str(exc)[:400]
        except Exception as exc:
            result["crash"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            result["traceback"] = traceback.format_exc()[-1500:]
        row[block] = result
    return row


def planned(model, block: str, x):
    """(rule, plan with stack=True: every place) for "residual"; for a model whose residuals all sit
    inside modules that fold their branches (RepVGG, MobileOne), for "conv": a block after each."""
    from attn_inject import AttnInjectError, plan

    try:
        return "residual", plan(model, block, after="residual", example_input=x, stack=True)
    except AttnInjectError:
        try:
            report = plan(model, block, after="conv", example_input=x, stack=True)
        except AttnInjectError:
            report = None
        if report is None or not report.folded:
            raise
        return "conv", report


NOISE = 1e-6  # input noise that shows how much float rounding the (unfolded) model amplifies


def reparameterized(model, x, moved) -> dict:
    """``timm.utils.reparameterize_model`` of a patched model (blocks off identity): the blocks it
    keeps and runs, and how far its output is from the unfolded model's, relative to the largest
    output value; for scale, how far the unfolded model's own output moves when NOISE is added to
    its input (a net that amplifies rounding this much cannot be held to a tighter fold)."""
    import timm
    import torch

    from attn_inject.finetune import attention_blocks
    from attn_inject.testing import blocks_not_run

    with torch.no_grad():
        noisy = model(x + NOISE * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
    try:
        fused = timm.utils.reparameterize_model(model)
        with torch.no_grad():
            out = fused(x)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {
        "blocks_kept": sorted(attention_blocks(fused)) == sorted(attention_blocks(model)),
        "not_run": blocks_not_run(fused, x),
        "max_rel_diff": relative_difference(out, moved),
        "input_noise_rel_diff": relative_difference(noisy, moved),
    }


def relative_difference(out, reference) -> float:
    """The largest absolute difference between two outputs, over the reference's largest value."""
    from torch.utils._pytree import tree_leaves

    diff = max((a - b).abs().max().item() for a, b in zip(tree_leaves(out), tree_leaves(reference)))
    scale = max(b.abs().max().item() for b in tree_leaves(reference))
    return float(f"{diff / scale:.3g}") if scale else diff


def worker(specs: list[str]) -> None:
    for spec in specs:
        print(json.dumps(run_one(spec)), flush=True)


# --------------------------------------------------------------------------------------------
# driver side


def all_specs() -> list[str]:
    import timm
    import torchvision

    timm_specs = [f"timm:{m}" for m in sorted(timm.list_modules())]
    tv_specs = [f"torchvision:{m}" for m in sorted(torchvision.models.list_models(module=torchvision.models))]
    return timm_specs + tv_specs


def third_party_specs() -> list[str]:
    """transformers models (TRANSFORMERS) and torchvision's whole detection and segmentation models."""
    import torchvision

    tv = [
        *torchvision.models.list_models(module=torchvision.models.detection),
        *torchvision.models.list_models(module=torchvision.models.segmentation),
    ]
    return [f"transformers:{m}" for m in TRANSFORMERS] + [f"torchvision:{m}" for m in sorted(tv)]


def run_isolated(spec: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.zoo", "--worker", spec]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {TIMEOUT} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"spec": spec, "error": f"worker died (exit {done.returncode}): {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def patched(row: dict, block: str) -> bool:
    """Sites found, bitwise identical, every block runs, and moving the blocks off identity shows."""
    result = row.get(block) or {}
    return (
        bool(result.get("sites"))
        and result.get("identical") is True
        and result.get("not_run") == 0
        and result.get("moved_changes_output") is True
    )


def summarize(rows: list[dict]) -> str:
    has_nchw = [r for r in rows if (r.get("oracle") or {}).get("nchw")]
    both = [r for r in has_nchw if patched(r, "se") and patched(r, "eca")]
    untraceable = [r for r in both if r.get("whole_model_fx") != "ok"]
    lines = [
        f"Families/models with an NCHW residual-looking add (oracle): {len(has_nchw)}; "
        f"patched with bitwise identity by both SE and ECA: {len(both)} "
        f"({100 * len(both) / max(1, len(has_nchw)):.1f} %), of which {len(untraceable)} cannot be traced "
        f"whole by torch.fx.symbolic_trace. (Weights made to look trained; patched = bitwise identical, "
        f"every block runs, and moving the blocks off identity changes the output.)",
        "",
        "| model | input | oracle adds NCHW/NHWC/other | whole-model fx | SE sites | ECA sites | identical "
        "| inject s (ECA) | has attention | reparameterize (ECA) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o = r.get("oracle") or {}
        se, eca = r.get("se") or {}, r.get("eca") or {}
        note = r.get("error") or eca.get("crash") or se.get("crash") or eca.get("refused") or se.get("refused") or ""
        for block, result in (("SE", se), ("ECA", eca)):
            if not note and result.get("not_run"):
                note = f"{block}: {result['not_run']} block(s) never run"
            if not note and result.get("moved_changes_output") is False:
                note = f"{block}: moving the blocks off identity does not change the output"
        if not note and eca.get("rule", "residual") != "residual":
            note = f"after {eca['rule']}: its residuals are inside modules that fold their branches"
        if not note and eca.get("untraced"):
            note = f"{len(eca['untraced'])} module(s) not traceable, e.g. {eca['untraced'][0]}"
        identical = {True: "yes", False: "NO"}.get(eca.get("identical") if "identical" in eca else None, "")
        if "identical" in se and se["identical"] is not True:
            identical = "NO (SE)"
        size = "x".join(map(str, (r.get("input") or [])[2:]))
        attended = f"{eca['attended']}{' (stacked)' if eca.get('stacked') else ''}" if eca.get("attended") else ""
        lines.append(
            f"| {r.get('model', r['spec'])} | {size} | {o.get('nchw', '')}/{o.get('nhwc', '')}/{o.get('other', '')} "
            f"| {'ok' if r.get('whole_model_fx') == 'ok' else 'fails' if r.get('whole_model_fx') else ''} "
            f"| {se.get('sites', 0)} | {eca.get('sites', 0)} | {identical} | {eca.get('seconds', '')} "
            f"| {attended} | {reparam_words(eca.get('reparameterized'))} | {note[:160].replace('|', '/')} |"
        )
    return "\n".join(lines)


def reparam_words(result: dict | None) -> str:
    if not result:
        return ""
    if "error" in result:
        return f"fails: {result['error'][:60]}"
    kept = "blocks kept" if result["blocks_kept"] and result["not_run"] == 0 else "BLOCKS LOST"
    noise = result.get("input_noise_rel_diff")
    words = f"{kept}, rel. diff {result['max_rel_diff']:.1e}"
    return words if noise is None else f"{words} (input noise: {noise:.1e})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument(
        "--only", nargs="+", metavar="SPEC", help="timm family names, torchvision:NAME or transformers:NAME"
    )
    parser.add_argument(
        "--third-party",
        action="store_true",
        help="transformers models and torchvision detection/segmentation models instead of the zoo",
    )
    parser.add_argument(
        "--blocks", nargs="+", default=["se", "eca"], help="blocks to inject, one at a time (default se eca)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="families run in parallel (default 2)")
    parser.add_argument("--out", type=Path, help="JSON-lines results (default benchmarks/results/zoo[-quick].jsonl)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    os.environ[BLOCKS_VARIABLE] = ",".join(args.blocks)  # the workers' blocks (they inherit the environment)
    specs = QUICK if args.quick else third_party_specs() if args.third_party else all_specs()
    if args.only:
        specs = [s if ":" in s else f"timm:{s}" for s in args.only]
    default_out = "zoo-quick.jsonl" if args.quick else "zoo-third-party.jsonl" if args.third_party else "zoo.jsonl"
    out = args.out or RESULTS / default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool, out.open("w") as sink:
        for row in pool.map(run_isolated, specs):
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(
                f"{row['spec']:40s} se={row.get('se', {}).get('sites', '-')} "
                f"eca={row.get('eca', {}).get('sites', '-')} "
                f"{row.get('error', '')[:80]}",
                file=sys.stderr,
                flush=True,
            )
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
