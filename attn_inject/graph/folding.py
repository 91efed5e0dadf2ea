"""Modules that fold their branches: RepVGG-style blocks whose ``reparameterize()`` (or
``switch_to_deploy()``, ``fuse()``, ``fuse_convs()``) replaces parallel training branches by one conv.

Such a module is one unit to the analysis: its own forward is never traced for editing (after the
fold it takes another path, and a block inside a branch would be folded away or call a deleted
child), and the place for a block is its output, in its caller's graph. What its caller sees
through it is what it folds into: the learned ops of a folded copy.

It is told by behaviour, not by class: a module whose class has one of the fold methods, and for
which calling that method on a copy replaces its children (deletes, adds or swaps a submodule) or
returns another module to put in its place (timm's ``fuse()`` convention). A method that changes
nothing (a module already reparameterized, built with ``inference_mode=True``) is not a fold: such
a module is analysed as the plain conv net it is. timm's ``reparameterize_model`` calls the same
methods in the same order.
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
            children = {key: id(child) for key, child in clone._modules.items()}
            with torch.no_grad():
                result = getattr(clone, name)()
        except Exception:  # needs arguments, or fails: not a fold this library can follow
            continue
        if isinstance(result, nn.Module) and result is not clone:
            return Fold(name, result)
        if {key: id(child) for key, child in clone._modules.items()} != children:
            return Fold(name, clone)
    return None
