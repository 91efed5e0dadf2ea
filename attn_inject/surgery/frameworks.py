"""Training frameworks as attn_inject sees them: a registry the integrations fill.

ultralytics, Hugging Face transformers and timm rebuild, save and load models their own way. The
surgery and file layers must not import them (they are optional) nor the integrations that know
them (an upper layer), so each integration registers one :class:`Framework` here when the package
is imported (``attn_inject.integrations``), and the lower layers ask the registry:

- ``inject`` / ``plan`` / ``save`` / ``eject`` take an object of the framework that holds a model
  (ultralytics' ``YOLO``) and work on the model it holds; after ``inject`` the framework is told to
  keep the blocks (``keep``: ultralytics replays the recipe on the model its trainer builds);
- a model the framework built is named as an architecture string in the recipe (``arch``) that
  ``load`` builds again (``build``, for the part after ``"<name>:"``);
- a change of a model's recipe is passed on (``recipe_changed``: Hugging Face writes it into the
  model's config, so ``save_pretrained`` keeps it), and what it saves can be loaded (``load_path``:
  a Hugging Face folder, an ultralytics .pt read as data).

Recognising an object never imports the framework: integrations compare class names along the MRO.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _nothing(*_: Any) -> None:
    return None


def _never(_: Any) -> bool:
    return False


@dataclass(frozen=True)
class Framework:
    """What attn_inject needs to know about one framework; every hook is optional."""

    name: str  # also the prefix of the arch strings it builds ("ultralytics:yolov8n.yaml")
    holds: Callable[[Any], nn.Module | None] = _nothing  # the model an object of the framework holds
    example_input: Callable[[Any], Any] = _nothing  # inject's default example input for that object or model
    keep: Callable[[Any], None] = _nothing  # after inject: make the object's workflow keep the blocks
    owns: Callable[[nn.Module], bool] = _never  # a model the framework built
    arch: Callable[[nn.Module], tuple[str, int | None] | None] = _nothing  # its arch string and classes
    build: Callable[[str, int | None], nn.Module] | None = None  # the model for an arch string's name
    injected: Callable[[nn.Module], None] = _nothing  # after a user's inject on an owned model
    recipe_changed: Callable[[nn.Module, Any], None] = _nothing  # the owned model's recipe (or None) changed
    # a file or folder this framework saved, as a patched model: (path, device, dtype) -> model, None if not its
    load_path: Callable[[Path, torch.device, torch.dtype | None], nn.Module | None] = _nothing


FRAMEWORKS: dict[str, Framework] = {}


def register_framework(framework: Framework) -> None:
    FRAMEWORKS[framework.name] = framework


def held_model(obj: Any) -> tuple[Framework, nn.Module] | None:
    """(framework, model) when ``obj`` is a framework's object holding a model, else None."""
    if obj is None:
        return None
    for framework in FRAMEWORKS.values():
        model = framework.holds(obj)
        if model is not None:
            return framework, model
    return None


def unwrapped(obj: Any) -> Any:
    """The model a framework's object holds, or ``obj`` itself."""
    held = held_model(obj)
    return obj if held is None else held[1]


def owners(model: nn.Module) -> list[Framework]:
    """The frameworks that built ``model``."""
    return [f for f in FRAMEWORKS.values() if f.owns(model)]


def builder(arch: str) -> Callable[[str, int | None], nn.Module] | None:
    """The build hook for ``"<framework>:NAME"``, if a framework registered that prefix."""
    prefix, sep, _ = arch.partition(":")
    framework = FRAMEWORKS.get(prefix) if sep else None
    return framework.build if framework is not None else None


_LIBRARY_CALL: ContextVar[bool] = ContextVar("attn_inject_library_call", default=False)


@contextmanager
def library_call() -> Iterator[None]:
    """While attn_inject itself injects (replaying a recipe, patching a file), not the user: the
    frameworks' ``injected`` notices are for the user's own calls."""
    token = _LIBRARY_CALL.set(True)
    try:
        yield
    finally:
        _LIBRARY_CALL.reset(token)


def is_library_call() -> bool:
    return _LIBRARY_CALL.get()
