"""What a file says about the data its model expects: timm's data config (input size, interpolation,
mean/std, crop) and the class names, written beside the recipe and put back on the model by ``load``.

On the model they live where timm keeps them, in ``model.pretrained_cfg`` (``input_size``,
``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``label_names``), so timm's own
``resolve_data_config(model=model)`` and attn_inject's example input read them. In the file they are
two metadata entries of JSON (keys sorted); read back, they are data: every field is checked and
bounded, nothing in them is run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from timm.data import resolve_data_config
from torch import nn

from ..errors import AttnInjectError
from ..graph.example import MAX_SIDE

DATA_CONFIG_KEY = "attn_inject.data_config"
CLASSES_KEY = "attn_inject.classes"
FIELDS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
CROP_MODES = ("center", "squash", "border")
MAX_CHANNELS = 64
MAX_CLASSES = 1_000_000
MAX_CLASS_NAME = 1024


@dataclass(frozen=True)
class DataInfo:
    """The data config (timm's ``resolve_data_config`` fields) and the class names, either may be unknown."""

    config: dict[str, Any] | None = None
    classes: tuple[str, ...] | None = None

    def metadata(self) -> dict[str, str]:
        """The file metadata entries (JSON, keys sorted) for what is known."""
        entries = {}
        if self.config is not None:
            entries[DATA_CONFIG_KEY] = json.dumps(_jsonable(self.config), sort_keys=True)
        if self.classes is not None:
            entries[CLASSES_KEY] = json.dumps(list(self.classes))
        return entries

    def summary(self) -> dict[str, Any]:
        return {"data_config": _jsonable(self.config) if self.config else None, "classes": self.classes}


def data_info_of(model: nn.Module) -> DataInfo:
    """What ``model`` knows about its data: the config of a timm-style ``pretrained_cfg`` (or the one
    ``remember_data`` set), and its ``label_names`` when they are one string per output."""
    cfg = _cfg(model)
    config = None
    if cfg is not None and "input_size" in cfg:
        config = {k: v for k, v in resolve_data_config({}, model=model).items() if k in FIELDS}
    names = cfg.get("label_names") if cfg is not None else None
    classes = None
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        classes = tuple(names)
    return DataInfo(config, classes)


def remember_data(model: nn.Module, info: DataInfo) -> None:
    """Put the data config and class names on ``model`` (its ``pretrained_cfg``, timm's place for them)."""
    if info.config is None and info.classes is None:
        return
    cfg = dict(_cfg(model) or {})
    if info.config is not None:
        cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in info.config.items()})
    if info.classes is not None:
        cfg["label_names"] = tuple(info.classes)
    model.__dict__["pretrained_cfg"] = cfg  # a plain attribute, as timm sets it


def read_data_info(metadata: Mapping[str, str], where: str) -> DataInfo:
    """The data config and classes of a file's metadata, checked; a bad entry names the field."""
    config = None
    text = metadata.get(DATA_CONFIG_KEY)
    if text is not None:
        config = _checked_config(_json(text, where, DATA_CONFIG_KEY), where)
    classes = None
    text = metadata.get(CLASSES_KEY)
    if text is not None:
        names = _json(text, where, CLASSES_KEY)
        if not (
            isinstance(names, list)
            and 0 < len(names) <= MAX_CLASSES
            and all(isinstance(n, str) and 0 < len(n) <= MAX_CLASS_NAME for n in names)
        ):
            raise _bad(where, "classes", f"a list of 1 to {MAX_CLASSES:,} non-empty names")
        classes = tuple(names)
    return DataInfo(config, classes)


def _checked_config(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or set(data) - set(FIELDS) or "input_size" not in data:
        raise _bad(where, "data_config", f"an object with input_size and some of {', '.join(FIELDS[1:])}")
    size = data["input_size"]
    if not (
        isinstance(size, list)
        and len(size) == 3
        and all(type(n) is int for n in size)
        and 0 < size[0] <= MAX_CHANNELS
        and all(0 < n <= MAX_SIDE for n in size[1:])
    ):
        raise _bad(where, "data_config.input_size", f"[channels, height, width], sides 1 to {MAX_SIDE}")
    channels = size[0]
    for name, positive in (("mean", False), ("std", True)):
        values = data.get(name)
        if values is not None and not (
            isinstance(values, list)
            and len(values) == channels
            and all(_finite(v) and (v > 0 or not positive) for v in values)
        ):
            raise _bad(where, f"data_config.{name}", f"{channels} finite numbers" + (" > 0" if positive else ""))
    if data.get("interpolation", "bilinear") not in INTERPOLATIONS:
        raise _bad(where, "data_config.interpolation", f"one of {', '.join(INTERPOLATIONS)}")
    crop = data.get("crop_pct")
    if crop is not None and not (_finite(crop) and 0 < crop <= 4):
        raise _bad(where, "data_config.crop_pct", "a number in (0, 4]")
    if data.get("crop_mode", "center") not in CROP_MODES:
        raise _bad(where, "data_config.crop_mode", f"one of {', '.join(CROP_MODES)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _cfg(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    return cfg if isinstance(cfg, dict) else None


def _json(text: str, where: str, key: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise AttnInjectError(
            f"metadata entry {key} is not valid JSON ({exc})",
            where=where,
            hint="The file was not written by attn_inject or was edited; write it again.",
        ) from None


def _bad(where: str, field: str, rule: str) -> AttnInjectError:
    return AttnInjectError(
        f"metadata field {field!r} must be {rule}",
        where=where,
        hint="The file was not written by attn_inject or was edited; write it again.",
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
