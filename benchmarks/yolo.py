"""YOLOv8n with and without attention, trained by ultralytics' own YOLO.train() on the same tiny budget,
and what the integration costs.

A smoke test, not an accuracy result: CPU only, no pretrained weights offline (every trainer starts
from the same seeded random init of ultralytics' bundled yolov8n.yaml, ``pretrained=False``, and a
patched one adds its blocks at the identity, so at step 0 all compute the same), eight
training images (four ``skimage.data`` photos and their mirror images, one or two boxes each), the
four photos as the validation set, ``--epochs`` epochs at ``--imgsz`` px, validated after the last.
Variants: plain YOLOv8n, and ``inject(yolo, block, after=rule)`` for ECA and SE after ``residual``
(6 sites) and ECA after ``conv`` (57 sites). Each runs ``yolo.train(...)`` then ``yolo.val(...)``; the script records:

- mAP50 and mAP50-95 of the final model, and its last training loss (box + cls + dfl);
- per epoch: the training seconds (``on_train_epoch_start`` to ``on_train_epoch_end``: forward,
  backward, optimizer, EMA) and the seconds from there to ``on_fit_epoch_end`` (checkpoint saves;
  after the last epoch also the validation, on a fused copy of the EMA model: ``val_s``);
- once per ``train()``: the seconds the trainer's ``get_model`` took (for a patched YOLO: the stock
  model and the recipe replayed on it; for plain YOLOv8n: the stock model), and the seconds
  ``inject`` took before;
- separately, ``inject(yolo, "eca", after=rule)`` with and without patching the alternate forwards
  (``forward_fuse``: what keeps the blocks through ``fuse()``), ``--inject-reps`` times each.

    .venv/bin/python -m benchmarks.yolo                 # 4 variants, 100 epochs at 64 px
    .venv/bin/python -m benchmarks.yolo --quick         # plain + ECA residual, 1 epoch at 64 px

ultralytics runs offline and writes only into a temporary folder (runs, settings, fonts; see
tests/helpers/yolo.py). Times are (wall, CPU) second pairs; the table shows CPU seconds of this process,
which other load on a shared machine changes far less than wall time (training runs on one thread,
ultralytics' choice on 2 cores). Raw results go to ``benchmarks/results/yolo.json`` unless ``--json``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.results_file import loadavg, write_results
from tests.helpers.yolo import detect_dataset, offline_environment, quiet_settings, train_args

VARIANTS = {  # name -> (block, rule) or None for the plain model
    "yolov8n": None,
    "+eca residual": ("eca", "residual"),
    "+se residual": ("se", "residual"),
    "+eca conv": ("eca", "conv"),
}
QUICK_VARIANTS = ["yolov8n", "+eca residual"]
DEFAULT_JSON = Path(__file__).parent / "results" / "yolo.json"


def _now() -> tuple[float, float]:
    """(wall, CPU) seconds: CPU seconds of this process tell costs apart on a loaded machine."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = _now()
    return now[0] - start[0], now[1] - start[1]


class _Clock:
    """ultralytics callbacks that time each epoch's training and validation and the trainer's get_model,
    as (wall, CPU) seconds."""

    def __init__(self) -> None:
        self.train: list[tuple[float, float]] = []
        self.val: list[tuple[float, float]] = []
        self.get_model: list[tuple[float, float]] = []
        self.threads = 0
        self._start = (0.0, 0.0)

    def attach(self, yolo: Any) -> None:
        yolo.add_callback("on_pretrain_routine_start", self._time_get_model)  # after keep_blocks' callback
        yolo.add_callback("on_train_epoch_start", self._mark)
        yolo.add_callback("on_train_epoch_end", self._train_done)
        yolo.add_callback("on_fit_epoch_end", self._val_done)

    def _time_get_model(self, trainer: Any) -> None:
        inner = trainer.get_model

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = _now()
            try:
                return inner(*args, **kwargs)
            finally:
                self.get_model.append(_since(start))

        trainer.get_model = timed

    def _mark(self, trainer: Any) -> None:
        self.threads = torch.get_num_threads()  # ultralytics sets its own for CPU training
        self._start = _now()

    def _train_done(self, trainer: Any) -> None:
        self.train.append(_since(self._start))
        self._start = _now()

    def _val_done(self, trainer: Any) -> None:
        self.val.append(_since(self._start))


def run_variant(name: str, data: Path, project: Path, epochs: int, imgsz: int) -> dict:
    from ultralytics import YOLO

    from attn_inject import inject
    from attn_inject.surgery.recipe import recipe_of

    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    spec = VARIANTS[name]
    start = _now()
    if spec is not None:
        inject(yolo, spec[0], after=spec[1])
    inject_seconds = _since(start) if spec is not None else None
    clock = _Clock()
    clock.attach(yolo)
    # pretrained=False: every trainer starts from its own seeded init (the blocks from their identity), so
    # at step 0 each patched model computes what the plain one does
    args = {
        **train_args(project, data, imgsz),
        "epochs": epochs,
        "pretrained": False,
        "val": False,  # validated after the last epoch only
        "name": name.replace(" ", "_").replace("+", ""),
    }
    yolo.train(**args)
    loss = yolo.trainer.tloss
    metrics = yolo.val(data=str(data), batch=4, **{k: v for k, v in args.items() if k in _VAL_ARGS})
    recipe = recipe_of(yolo.model)
    later = clock.train[1:] or clock.train  # the first epoch also warms up
    return {
        "blocks": 0 if recipe is None else len(recipe.modules),
        "params": sum(p.numel() for p in yolo.model.parameters()),
        "map50": float(metrics.box.map50),
        "map50_95": float(metrics.box.map),
        "last_train_loss": None if loss is None else float(sum(float(v) for v in loss.values())),
        "inject_s": inject_seconds,
        "get_model_s": clock.get_model,
        "epoch_train_s": clock.train,
        "epoch_val_s": clock.val,
        "median_epoch_train_s": [statistics.median(t[i] for t in later) for i in (0, 1)],
        "val_s": clock.val[-1],
        "train_threads": clock.threads,
    }


def inject_cost(reps: int) -> dict:
    """CPU seconds of ``inject(yolo, "eca", after=rule)`` on a fresh YOLOv8n, with and without patching
    the alternate forwards (the registry emptied for the second): what keeping the blocks through
    ``fuse()`` costs at inject time."""
    from ultralytics import YOLO

    from attn_inject import inject
    from attn_inject.graph import alternates

    result = {}
    for rule in ("residual", "conv"):
        row: dict[str, Any] = {}
        for label, registry in (("with_alternates", dict(alternates.ALTERNATE_FORWARDS)), ("without", {})):
            saved = dict(alternates.ALTERNATE_FORWARDS)
            alternates.ALTERNATE_FORWARDS.clear()
            alternates.ALTERNATE_FORWARDS.update(registry)
            try:
                times = []
                for _ in range(reps):
                    yolo = YOLO("yolov8n.yaml")
                    start = _now()
                    inject(yolo, "eca", after=rule)
                    times.append(_since(start)[1])
                    fused = sum(1 for m in yolo.model.modules() if "forward_fuse" in m.__dict__)
            finally:
                alternates.ALTERNATE_FORWARDS.clear()
                alternates.ALTERNATE_FORWARDS.update(saved)
            row[label] = statistics.median(times)
            row[f"{label}_patched_forward_fuse"] = fused
        result[rule] = row
    return result


_VAL_ARGS = ("project", "imgsz", "device", "workers", "plots", "verbose", "exist_ok")


def print_report(result: dict) -> None:
    config = result["config"]
    print(
        f"\nYOLOv8n on {config['train_images']} training images, {config['epochs']} epoch(s) at {config['imgsz']} px, "
        f"CPU, {config['train_threads']} training thread(s) (ultralytics' choice), load {config['loadavg']} "
        "(smoke level: random init, tiny data)\n"
    )
    print("CPU seconds of this process (wall seconds in the JSON)\n")
    print(
        "| model | blocks | params | mAP50 | mAP50-95 | last train loss | epoch train | last val | get_model | inject |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in result["models"].items():
        inject = "" if row["inject_s"] is None else f"{row['inject_s'][1]:.2f}"
        print(
            f"| {name} | {row['blocks']} | {row['params']:,} | {row['map50']:.3f} | {row['map50_95']:.3f} | "
            f"{row['last_train_loss']:.3f} | {row['median_epoch_train_s'][1]:.2f} | {row['val_s'][1]:.2f} | "
            f"{row['get_model_s'][0][1]:.2f} | {inject} |"
        )
    print("\ninject(yolo, 'eca', after=RULE), CPU seconds, median: with the alternate forwards patched / without\n")
    print("| rule | with forward_fuse | without | forward_fuse patched |")
    print("|---|---|---|---|")
    for rule, row in result["inject_cost"].items():
        print(
            f"| {rule} | {row['with_alternates']:.3f} | {row['without']:.3f} | "
            f"{row['with_alternates_patched_forward_fuse']} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="plain and ECA residual, 1 epoch at 64 px")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="which models (default: all)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads outside training (inject, val)"
    )
    parser.add_argument("--inject-reps", type=int, default=5, help="injects timed per rule and registry")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    home = offline_environment()
    quiet_settings()
    variants = QUICK_VARIANTS if args.quick else args.variants or list(VARIANTS)
    epochs, imgsz = (1, 64) if args.quick else (args.epochs, args.imgsz)
    before = loadavg()
    with tempfile.TemporaryDirectory() as folder:
        data = detect_dataset(Path(folder) / "data", size=imgsz, mirrored=True)
        models = {}
        for name in variants:
            torch.set_num_threads(args.threads)  # ultralytics sets its own for CPU training
            models[name] = run_variant(name, data, Path(folder) / "runs", epochs, imgsz)
        torch.set_num_threads(args.threads)
        cost = inject_cost(1 if args.quick else args.inject_reps)
    shutil.rmtree(home, ignore_errors=True)
    result = {
        "config": {
            "epochs": epochs,
            "imgsz": imgsz,
            "train_images": 8,
            "threads": args.threads,
            "train_threads": models[variants[0]]["train_threads"],
            "loadavg": [before, loadavg()],
        },
        "models": models,
        "inject_cost": cost,
    }
    write_results(args.json, result, print_report)


if __name__ == "__main__":
    main()
