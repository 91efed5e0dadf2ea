"""How long and how much memory a hostile file makes ``load()`` (and ``inspect``) take, against the
honest file it was edited from.

The honest files: timm ``resnet18`` (configured 3x224x224) and the tiny ``test_resnet`` (3x160x160),
each with weights that look trained and ECA after every residual, saved with ``save()``. Each
hostile case is a small edit of one, as an attacker or a careless user would make it (the example
input bombs, 300 maximal rules and the other cases of issue 17, and files at each bound: the largest
example input, recipe, header and tensor count a file may have). Every case runs in a fresh
process: ``describe_file`` (what ``attn-inject inspect`` runs) is timed, then the peak resident
memory is reset (``/proc/self/clear_refs``) and ``load()`` is timed with its peak memory above the
memory before it. The goal: every hostile load under 2 s and under 2x the honest file's memory.

    .venv/bin/python -m benchmarks.hostile_load             # both models, every case
    .venv/bin/python -m benchmarks.hostile_load --quick     # test_resnet, three cases, in one process

Raw results go to ``benchmarks/results/hostile_load.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

from attn_inject import inject, load, save
from attn_inject.files.arch import create_model
from attn_inject.files.describe import describe_file
from attn_inject.surgery.recipe import MAX_INJECTIONS, MAX_RECIPE_CHARS
from attn_inject.surgery.recipe import recipe_of as model_recipe
from attn_inject.testing import look_trained, move_off_identity
from benchmarks.peak_memory import measured
from benchmarks.results_file import loadavg, write_results
from tests.helpers.safetensors_edit import (
    join,
    map_tensors,
    recipe_of,
    split,
    with_metadata,
    with_recipe,
    with_tensor,
    with_tensor_bytes,
)

DEFAULT_JSON = Path("benchmarks/results/hostile_load.json")
MODELS = {"resnet18": "basic", "test_resnet": "residual"}


def big_rule(index: int, patterns: int = 6000) -> str:
    """A rule named ``big{index}`` with ``patterns`` include patterns, none of which matches."""
    include = ", ".join(f'"g{i}*"' for i in range(patterns))
    return f"name: big{index}\nmatch: {{kind: residual}}\ninclude: [{include}]\n"


def first(change: Callable[[dict], Any]) -> Callable[[dict], Any]:
    return lambda recipe: change(recipe["injections"][0])


def shapes(*shape: int) -> Callable[[bytes], bytes]:
    return lambda raw: with_recipe(raw, first(lambda inj: inj.update(input_shapes=[list(shape)])))


def duplicate_name(raw: bytes) -> bytes:
    header, data = split(raw)
    name = next(k for k in header if k != "__metadata__")
    entry = json.dumps(name) + ":" + json.dumps(header[name], separators=(",", ":"))
    text = json.dumps(header, separators=(",", ":"))
    return join(text.replace(entry, f"{entry},{entry}", 1), data)


def nan_weight(raw: bytes) -> bytes:
    header, _ = split(raw)
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    return with_tensor_bytes(raw, name, torch.full(header[name]["shape"], float("nan")))


def half_weights(raw: bytes) -> bytes:
    def half(_name: str, entry: dict, chunk: bytes) -> torch.Tensor | None:
        if entry["dtype"] != "F32":
            return None
        return torch.frombuffer(bytearray(chunk), dtype=torch.float32).reshape(entry["shape"]).half()

    return map_tensors(raw, half)


def wrong_block_shape(raw: bytes) -> bytes:
    name = next(k for k in split(raw)[0] if ".se." in k)
    return with_tensor(raw, name, torch.zeros(1, 1, 5))


def many_tensors(raw: bytes) -> bytes:
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(50_000)}
    return join({"__metadata__": split(raw)[0]["__metadata__"], **header}, b"")


def header_at_the_bound(raw: bytes) -> bytes:
    padding = (8 << 20) - len(raw) + len(split(raw)[1]) - 200  # just under 8 MiB of header
    return with_metadata(raw, **{"attn_inject.padding": "x" * padding})


def largest_recipe(raw: bytes) -> bytes:
    """Four rules of include patterns, as many as keep the recipe within MAX_RECIPE_CHARS."""

    def rules(patterns: int) -> list[str]:
        return [big_rule(r, patterns) for r in range(4)]

    def recipe(patterns: int) -> str:
        edited = recipe_of(raw)
        edited["injections"][0]["rules"] = rules(patterns)
        return json.dumps(edited)

    low, high = 0, 20_000  # the most patterns that fit, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(recipe(mid)) <= MAX_RECIPE_CHARS else (low, mid - 1)
    return with_recipe(raw, first(lambda inj: inj.update(rules=rules(low))))


def eight_injections(raw: bytes) -> bytes:
    """The honest file's model with its injection made again, stacked, until it holds the most a file
    may replay (blocks off identity), written by ``save``: an honest file at the bound, which ``load``
    rebuilds with eight analyses and injections."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "honest.safetensors"
        source.write_bytes(raw)
        model = load(source)
        injection = model_recipe(model).injections[0]  # the recipe load() gave the model
        for _ in range(MAX_INJECTIONS - 1):
            inject(model, injection.block, list(injection.rules), stack=True, **dict(injection.options))
        move_off_identity(model)
        return save(model, Path(folder) / "eight.safetensors").read_bytes()


def optional_convs(raw: bytes) -> bytes:
    rule = "name: o\nmatch:\n  convs: [" + ", ".join(["{optional: true}"] * 2000) + ", {kernel: 7}]\n"
    return with_recipe(raw, first(lambda inj: inj.update(rules=[rule])))


def cases(configured: tuple[int, ...]) -> dict[str, Callable[[bytes], bytes]]:
    c, h, w = configured
    return {
        "honest": lambda raw: raw,
        "example input 1x3x4096x4096 (issue: 28 s, 3 GB)": shapes(1, 3, 4096, 4096),
        "example input 1x3x18258x18258 (issue: 232 s, 8.4 GB)": shapes(1, 3, 18258, 18258),
        f"largest example allowed: 1x{c}x{2 * h}x{2 * w}": shapes(1, c, 2 * h, 2 * w),
        f"largest batch allowed: 4x{c}x{h}x{w}": shapes(4, c, h, w),
        "300 maximal rules (issue: 12 s inspect, 14 s load)": lambda raw: with_recipe(
            raw, first(lambda inj: inj.update(rules=[big_rule(i) for i in range(300)]))
        ),
        "largest recipe allowed: 4 rules, 262,144 characters in all": largest_recipe,
        "8 injections, stacked (the most allowed)": eight_injections,
        "a rule of 2,000 optional convs": optional_convs,
        "header length 2**40": lambda raw: (1 << 40).to_bytes(8, "little") + raw[8:],
        "header just under 8 MiB": header_at_the_bound,
        "50,000 tensors (the most allowed)": many_tensors,
        "duplicate tensor name": duplicate_name,
        "num_classes 10**40": lambda raw: with_recipe(raw, lambda recipe: recipe.update(num_classes=10**40)),
        "num_classes 100,000 (the most allowed)": lambda raw: with_recipe(
            raw, lambda recipe: recipe.update(num_classes=100_000)
        ),
        "arch resnet152 (another, larger model)": lambda raw: with_recipe(
            raw, lambda recipe: recipe.update(arch="resnet152")
        ),
        "arch eva02_enormous_patch14_clip_224 (a giant model, built on meta)": lambda raw: with_recipe(
            raw, lambda recipe: recipe.update(arch="eva02_enormous_patch14_clip_224")
        ),
        "NaN weights": nan_weight,
        "fp16 weights": half_weights,
        "an injected tensor of the wrong shape": wrong_block_shape,
    }


QUICK_CASES = [
    "honest",
    "example input 1x3x4096x4096 (issue: 28 s, 3 GB)",
    "300 maximal rules (issue: 12 s inspect, 14 s load)",
]


def honest_file(arch: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = inject(look_trained(create_model(arch)), "eca", MODELS[arch])
    move_off_identity(model)
    return save(model, folder / f"{arch}.safetensors")


def measure_here(path: Path, threads: int) -> dict[str, Any]:
    """``describe_file`` then ``load`` of ``path`` in this process: seconds, outcome, and the peak
    resident memory from just before each (Linux: /proc/self/clear_refs resets the peak)."""
    torch.set_num_threads(threads)
    return {
        name: measured(lambda run=run: run(path), str(path))
        for name, run in (("inspect", describe_file), ("load", load))
    }


def measure(path: Path, threads: int, fresh: bool) -> dict[str, Any]:
    """``measure_here`` in a fresh process (``fresh``: no memory or caches left by earlier cases)."""
    if not fresh:
        return measure_here(path, threads)
    argv = [sys.executable, "-m", "benchmarks.hostile_load", "--child", str(path), "--threads", str(threads)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_report(result: dict[str, Any]) -> None:
    for arch, rows in result["models"].items():
        honest = rows["honest"]["load"]
        honest_mb = (honest["peak_rss"] - honest["rss_before"]) / 2**20
        print(f"\n### {arch}: honest load {honest['seconds']:.2f} s, {honest_mb:.0f} MB above its start\n")
        print("| case | file MB | inspect s | load s | load peak above start MB | x honest | load |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for case, row in rows.items():
            if "error" in row:
                print(f"| {case} | | | | | | ERROR {row['error']} |")
                continue
            load = row["load"]
            above = (load["peak_rss"] - load["rss_before"]) / 2**20
            print(
                f"| {case} | {row['bytes'] / 2**20:.1f} | {row['inspect']['seconds']:.2f} | {load['seconds']:.2f} | "
                f"{above:.0f} | {above / honest_mb:.2f} | {load['outcome']} |"
            )
        hostile = [r for c, r in rows.items() if c != "honest" and "error" not in r]
        worst_s = max(r["load"]["seconds"] for r in hostile)
        worst_mb = max((r["load"]["peak_rss"] - r["load"]["rss_before"]) / 2**20 for r in hostile)
        print(
            f"\nworst hostile load: {worst_s:.2f} s (goal < 2 s), {worst_mb:.0f} MB above its start = "
            f"{worst_mb / honest_mb:.2f}x the honest load (goal < 2x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="test_resnet, three cases, in this process")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in each load")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"raw results (default {DEFAULT_JSON})")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # measure one file here, print JSON
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_here(args.child, args.threads)))
        return
    before = loadavg()
    models: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ["test_resnet"] if args.quick else list(MODELS):
            raw = honest_file(arch, Path(tmp)).read_bytes()
            configured = tuple(timm.create_model(arch).pretrained_cfg["input_size"])
            rows = models.setdefault(arch, {})
            for case, edit in cases(configured).items():
                if args.quick and case not in QUICK_CASES:
                    continue
                path = Path(tmp) / "case.safetensors"
                path.write_bytes(edit(raw))
                start = time.perf_counter()
                rows[case] = {**measure(path, args.threads, fresh=not args.quick), "bytes": path.stat().st_size}
                print(f"{arch}: {case}: {time.perf_counter() - start:.1f} s in all", file=sys.stderr)
    result = {
        "config": {
            "quick": args.quick,
            "threads": args.threads,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "loadavg_before": before,
            "loadavg_after": loadavg(),
        },
        "models": models,
    }
    write_results(args.json, result, print_report)


if __name__ == "__main__":
    main()
