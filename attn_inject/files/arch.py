"""Architecture strings: building a model from a timm name, torchvision:NAME, a registered framework's
name (``ultralytics:yolov8n.yaml``, surgery/frameworks.py), or package.module:factory."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

import timm
import torchvision
from torch import nn

from ..errors import AttnInjectError, first_line, one_line
from ..surgery.frameworks import builder
from ..surgery.recipe import Recipe, check_num_classes, set_recipe


class BuildFailed(AttnInjectError):
    """The model's own code failed to build it (not an unknown or unimportable arch)."""


def create_model(arch: str, num_classes: int | None = None, options: dict[str, Any] | None = None) -> nn.Module:
    """An untrained model for ``arch`` (weights come from a checkpoint; nothing is downloaded).

    ``options`` are further keyword arguments of the model's factory that change training only (timm's
    ``drop_path_rate``); a factory that does not take one is an error naming it. The model remembers
    ``arch`` and ``num_classes`` (``recipe.recipe_of``; for timm and torchvision classifiers the head
    it was built with when none is given), so ``save`` can write them. A factory that fails
    (arguments it does not take, a size it cannot build) is one AttnInjectError.
    """
    check_num_classes(num_classes)
    try:
        model = _create(arch, num_classes, options or {})
    except AttnInjectError:
        raise
    except Exception as exc:
        if options and isinstance(exc, TypeError):
            raise AttnInjectError(
                f"{arch} does not take {', '.join(options)} ({first_line(exc)})",
                hint="Leave it out for this model (timm models take drop_path_rate).",
            ) from None
        raise BuildFailed(
            f"building {arch!r}"
            + ("" if num_classes is None else f" with num_classes={num_classes}")
            + f" failed: {one_line(exc)}",
            hint="Check the arch (and --num-classes).",
        ) from None
    if num_classes is None and (":" not in arch or arch.startswith("torchvision:")):
        num_classes = head_outputs(model, arch)  # the head it was built with, as save() records it
    set_recipe(model, Recipe(arch, num_classes))
    return model


def head_outputs(model: nn.Module, arch: str | None) -> int | None:
    """The classifier's outputs, where they are known for sure: timm's (or a model's own) int
    ``num_classes``, else for a torchvision classifier its last layer's ``out_features``."""
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        return num_classes
    if arch is not None and arch.startswith("torchvision:") and arch.split(":", 1)[1] in _torchvision_classifiers():
        last = next(reversed([m for m in model.modules() if not next(m.children(), None)]), None)
        return last.out_features if isinstance(last, nn.Linear) else None
    return None


def default_input_size(arch: str | None) -> tuple[int, ...] | None:
    """The input size a timm model named ``arch`` is built with (its default pretrained config), or None."""
    if arch is None or ":" in arch or not timm.is_model(arch):
        return None
    cfg = timm.models.get_pretrained_cfg(arch)
    return None if cfg is None or cfg.input_size is None else tuple(cfg.input_size)


def _torchvision_classifiers() -> set[str]:
    return set(torchvision.models.list_models(module=torchvision.models))


def _create(arch: str, num_classes: int | None, options: dict[str, Any]) -> nn.Module:
    extra: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    extra.update(options)
    if arch.startswith("torchvision:"):
        return _torchvision(arch.split(":", 1)[1], extra)
    build = builder(arch)
    if build is not None:  # a framework's model by name (ultralytics:yolov8n.yaml): a name, not code
        if options:
            raise AttnInjectError(f"{arch} does not take {', '.join(options)}", hint="Leave it out for this model.")
        return build(arch.partition(":")[2], num_classes)
    if ":" in arch:
        return _factory(arch, extra)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise AttnInjectError(
            f"unknown timm model {arch!r}",
            hint=(f"Did you mean {', '.join(close)}? " if close else "")
            + "Use a timm name, torchvision:NAME or package.module:factory.",
        )
    return timm.create_model(arch, pretrained=False, **extra)


def _torchvision(name: str, extra: dict) -> nn.Module:
    try:
        return torchvision.models.get_model(name, weights=None, **extra)
    except ValueError:
        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=3)
        raise AttnInjectError(
            f"unknown torchvision model {name!r}",
            hint=f"Did you mean {', '.join(close)}?" if close else "See torchvision.models.list_models().",
        ) from None


def _factory(arch: str, extra: dict) -> nn.Module:
    module_name, _, attr = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise AttnInjectError(
            f"cannot import {arch!r}: {exc}", hint="Use package.module:factory, importable here."
        ) from None
    model = factory(**extra)
    if not isinstance(model, nn.Module):
        raise AttnInjectError(f"{arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model
