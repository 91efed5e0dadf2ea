"""Modules that fold their branches: RepVGG-style blocks whose ``reparameterize()`` (or
``switch_to_deploy()``, ``fuse()``, ``fuse_convs()``) replaces parallel training branches by one conv.

Such a module is one unit to the analysis: its own forward is never traced for editing (after the
fold it takes another path, and a block inside a branch would be folded away or call a deleted
child), and the place for a block is its output, in its caller's graph. What its caller sees
through it is what it folds into: the learned ops of a folded copy.

It is told by behaviour, not by class: a module whose class has one of the fold methods, and for
which calling that method on a copy changes the module's make-up — a submodule deleted, added or
swapped anywhere below it, or a plain attribute set (EfficientViM's block flips ``fused`` and its
forward takes another path) — or returns another module to put in its place (timm's ``fuse()``
convention). A method that changes nothing (a module already reparameterized, built with
``inference_mode=True``) is not a fold: such a module is analysed as the plain conv net it is.
timm's ``reparameterize_model`` calls the same methods in the same order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

FOLD_METHODS = ("fuse", "reparameterize", "switch_to_deploy", "fuse_convs")


@dataclass(frozen=True)
class Fold:
    """How a module folds: the method, and a copy of the module as that method leaves it."""

    method: str
    folded: nn.Module


def has_fold_method(module: nn.Module) -> bool:
    """Whether the module's class has a fold method (folded or not)."""
    return any(callable(getattr(type(module), name, None)) for name in FOLD_METHODS)


def find_fold(module: nn.Module) -> Fold | None:
    """The fold of ``module``: the first of its fold methods that, called without arguments on a
    copy, replaces the copy's children or returns another module; None if it has none."""
    for name in FOLD_METHODS:
        if not callable(getattr(type(module), name, None)):
            continue
        try:
            clone = copy.deepcopy(module)
            before = _make_up(clone)
            with torch.no_grad():
                result = getattr(clone, name)()
        except Exception:  # needs arguments, or fails: not a fold this library can follow
            continue
        if isinstance(result, nn.Module) and result is not clone:
            return Fold(name, result)
        if _make_up(clone) != before:
            return Fold(name, clone)
    return None


_FLAGS = (bool, int, float, str, type(None))


def _make_up(module: nn.Module) -> list[tuple]:
    """What a fold changes: every submodule (by path and identity) and its plain attributes."""
    return [
        (path, id(sub), sorted((k, v) for k, v in vars(sub).items() if type(v) in _FLAGS and k != "training"))
        for path, sub in module.named_modules()
    ]
