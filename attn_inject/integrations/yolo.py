"""ultralytics YOLO: blocks kept through train, val, predict, export and checkpoints; models named by YAML.

ultralytics is optional: nothing here imports it until a YOLO object or model is handled, and both
are recognised by class names. What ultralytics does, and how the blocks stay:

- ``YOLO.train()`` builds a new model in its trainer (from the YAML, then copies weights from the
  old one by name): the blocks and, for a YAML-built YOLO, the user's weights would be dropped.
  ``keep_blocks(yolo)`` (``inject(yolo, ...)`` calls it) adds one callback to that YOLO object,
  on ``on_pretrain_routine_start``: it gives the trainer a ``get_model`` that builds the stock
  model, replays the recipe of the weights or of the YOLO's model on it (fresh identity blocks,
  the same names), then lets ultralytics load the weights into it by name, block tensors included.
  That covers the first training, resume and fine-tuning a ``YOLO("best.pt")`` it saved.
- ``fuse()`` (val, predict, export) swaps each Conv's forward for ``forward_fuse``: inject patched
  that method too (graph/alternates.py).
- Checkpoints pickle the model, blocks and recipe included, so ``YOLO("best.pt")`` has the blocks
  (attn_inject must be importable there).

A model built from a YAML bundled with ultralytics is named ``ultralytics:<yaml file>`` in its
recipe (with ``nc`` as the classes), and ``load`` builds it from that bundled YAML alone: a name,
never a path (an ultralytics YAML can run code through ``activation:``).
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AttnInjectError
from ..files.saving import replay
from ..graph.example import parameter_dtype_device, seeded_tensors
from ..surgery.recipe import Recipe, recipe_of

log = logging.getLogger(__name__)

_MODEL = "ultralytics.engine.model.Model"  # YOLO, RTDETR, YOLOWorld, ... objects
_BASE_MODEL = "ultralytics.nn.tasks.BaseModel"  # DetectionModel, SegmentationModel, ...
# model class by the module that ends the YAML's head, where the task alone does not tell it
_HEAD_CLASSES = {
    "RTDETRDecoder": "RTDETRDetectionModel",
    "WorldDetect": "WorldModel",
    "YOLOEDetect": "YOLOEModel",
    "YOLOESegment": "YOLOESegModel",
}
_TASK_CLASSES = {
    "detect": "DetectionModel",
    "segment": "SegmentationModel",
    "pose": "PoseModel",
    "classify": "ClassificationModel",
    "obb": "OBBModel",
    "semantic": "SemanticSegmentationModel",
    "depth": "DepthModel",
}
EXAMPLE_SIDE = 64  # px of the example image: the analysis needs shapes, not detail
_YAML_NAME = re.compile(r"[A-Za-z0-9_.-]+\.ya?ml")
_FREE_KEYS = ("nc", "yaml_file", "scale")  # YAML keys a model may differ in from its bundled file
_DEFAULTS = {"channels": 3}  # keys the model adds to what the bundled file says


def _is(obj: Any, qualified: str) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == qualified for c in type(obj).__mro__)


def is_yolo(obj: Any) -> bool:
    """An ultralytics YOLO (or RTDETR, ...) object."""
    return _is(obj, _MODEL)


def is_ultralytics_model(model: Any) -> bool:
    """A model ultralytics built (DetectionModel, SegmentationModel, ...)."""
    return _is(model, _BASE_MODEL)


def held_model(yolo: Any) -> nn.Module | None:
    """The PyTorch model a YOLO object holds; None for anything else."""
    if not is_yolo(yolo):
        return None
    model = yolo.model
    if not isinstance(model, nn.Module):
        raise AttnInjectError(
            f"the {type(yolo).__name__} object holds {model!r}, not a PyTorch model",
            hint="Inject into a YOLO built from a .yaml or loaded from a .pt; exported formats cannot be patched.",
        )
    return model


def example_input(yolo_or_model: Any) -> torch.Tensor:
    """One small image for the example forward: twice the largest stride, at least EXAMPLE_SIDE px."""
    model = yolo_or_model.model if is_yolo(yolo_or_model) else yolo_or_model
    channels = model.yaml.get("channels", 3) if isinstance(getattr(model, "yaml", None), dict) else 3
    stride = getattr(model, "stride", None)
    side = max(EXAMPLE_SIDE, 2 * int(torch.as_tensor(stride).max())) if stride is not None else EXAMPLE_SIDE
    return seeded_tensors([(1, channels, side, side)], *parameter_dtype_device(model))[0]


def keep_blocks(yolo: Any) -> Any:
    """Make ``yolo.train()`` keep the blocks its model (or the weights it trains from) carries.

    Adds one callback to this YOLO object (once): the trainer then builds its model as usual,
    replays the recipe on it and loads the weights by name, block tensors included. Call it on a
    ``YOLO("best.pt")`` of a patched model before training it again; ``inject(yolo, ...)`` calls it.
    Returns ``yolo``.
    """
    if not is_yolo(yolo):
        raise AttnInjectError(f"keep_blocks() takes an ultralytics YOLO object, not {type(yolo).__name__}")
    if not any(isinstance(cb, _KeepBlocks) for cb in yolo.callbacks["on_pretrain_routine_start"]):
        yolo.add_callback("on_pretrain_routine_start", _KeepBlocks(yolo))
    return yolo


def kept(yolo: Any) -> None:
    """After ``inject(yolo, ...)``: keep the blocks in training; the cached predictor ran the old model."""
    keep_blocks(yolo)
    yolo.predictor = None


class _KeepBlocks:
    """The callback: runs before the trainer builds its model (and before its optimizer and EMA)."""

    def __init__(self, yolo: Any):
        self.yolo = yolo

    def __call__(self, trainer: Any) -> None:
        stock = type(trainer).get_model
        trainer.get_model = types.MethodType(functools.partial(_get_model, stock=stock, yolo=self.yolo), trainer)


def _get_model(trainer: Any, cfg: Any = None, weights: Any = None, verbose: bool = True, *, stock, yolo) -> nn.Module:
    """The trainer's model: the stock one, with the recipe of the weights (or of the YOLO's model)
    replayed on it before ultralytics loads the weights into it."""
    source, where = (weights, "the weights it trains from") if _patched(weights) else (yolo.model, "the YOLO's model")
    if not _patched(source):
        return stock(trainer, cfg=cfg, weights=weights, verbose=verbose)
    recipe = recipe_of(source)
    assert recipe is not None  # _patched
    model = stock(trainer, cfg=cfg, weights=None, verbose=verbose)
    replay(model, recipe, f"{type(source).__name__} ({where})")
    if weights is None and trainer.args.pretrained is not False:
        weights = source  # a YAML-built YOLO: train the model it holds, not a fresh one
    if weights is not None:
        model.load(weights, verbose=verbose)  # by name: the block tensors exist on both sides now
    _log_replayed(recipe, model, where)
    return model


def _patched(model: Any) -> bool:
    recipe = recipe_of(model) if isinstance(model, nn.Module) else None
    return recipe is not None and bool(recipe.injections)


def _log_replayed(recipe: Recipe, model: nn.Module, where: str) -> None:
    from ultralytics.utils import LOGGER

    done = ", ".join(f"{len(i.modules)} {i.block} after {'+'.join(r.name for r in i.rules)}" for i in recipe.injections)
    LOGGER.info(f"attn_inject: replayed {done} on the trainer's {type(model).__name__} from the recipe of {where}")


def warn_bare_model(model: nn.Module) -> None:
    """After ``inject(yolo.model, ...)``: the YOLO object that holds it does not know."""
    log.warning(
        "patched a bare %s: a YOLO object's train() builds a new model from the YAML and drops the blocks; "
        "pass the YOLO object to inject() or call attn_inject.keep_blocks(yolo) before training "
        "(val, predict, export and save keep them)",
        type(model).__name__,
    )


# ---------------------------------------------------------------------------------------------
# ultralytics:NAME.yaml


@functools.lru_cache(maxsize=64)
def bundled_yaml(name: str) -> Path | None:
    """The YAML bundled with ultralytics that ``name`` (yolov8n.yaml, yolo11s-seg.yaml) builds from, or
    None: a plain file name only, found under the package's cfg/models, never a path."""
    if not _YAML_NAME.fullmatch(name):
        return None
    import ultralytics

    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    scaled = Path(name)  # yolov8n.yaml is yolov8.yaml at scale n, as ultralytics reads it
    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", scaled.stem) + scaled.suffix
    found = sorted(p for p in root.rglob("*.y*ml") if p.name in (name, unified))
    exact = [p for p in found if p.name == name]
    return next(iter(exact or found), None)


def bundled_config(name: str) -> dict:
    """The model YAML ``ultralytics:<name>`` builds, as ultralytics reads it (with its scale)."""
    return copy.deepcopy(_bundled_config(name))


@functools.lru_cache(maxsize=64)
def _bundled_config(name: str) -> dict:
    path = bundled_yaml(name)
    if path is None:
        raise AttnInjectError(
            f"{name!r} is not a model YAML bundled with ultralytics",
            hint="Name one of its own files, e.g. ultralytics:yolov8n.yaml or ultralytics:yolo11s-seg.yaml.",
        )
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load(path.parent / name)  # the scale letter picks a row of the unified file's scales
    cfg["yaml_file"] = name
    return cfg


def build_model(name: str, num_classes: int | None) -> nn.Module:
    """An untrained ultralytics model from a bundled YAML (``ultralytics:<name>``), ``num_classes`` classes."""
    from ultralytics.nn import tasks

    cfg = bundled_config(name)
    head = cfg["head"][-1][2]
    cls = getattr(tasks, _HEAD_CLASSES.get(head) or _TASK_CLASSES[tasks.guess_model_task(cfg)])
    return cls(cfg, ch=cfg.get("channels", 3), nc=num_classes, verbose=False)


def yaml_difference(cfg: dict) -> str | None:
    """How a model's YAML differs from the bundled file its ``yaml_file`` names (None: it does not)."""
    name = Path(str(cfg.get("yaml_file", ""))).name
    if bundled_yaml(name) is None:
        return f"its YAML {name or '(unnamed)'!r} is not one bundled with ultralytics"
    bundled = {**_DEFAULTS, **bundled_config(name)}
    for key in sorted(set(cfg) | set(bundled)):
        if key not in _FREE_KEYS and cfg.get(key) != bundled.get(key):
            return f"its YAML differs from the bundled {name} at {key!r} ({cfg.get(key)!r} vs {bundled.get(key)!r})"
    return None


def arch_of(model: nn.Module) -> tuple[str, int | None] | None:
    """``("ultralytics:<yaml file>", nc)`` for a model built from a bundled YAML, unchanged; else None."""
    cfg = getattr(model, "yaml", None)
    if not isinstance(cfg, dict) or yaml_difference(cfg) is not None:
        return None
    nc = cfg.get("nc")
    return f"ultralytics:{Path(str(cfg['yaml_file'])).name}", nc if isinstance(nc, int) else None
