"""Eject: take every injected block out of a model and give back its original forwards.

``inject`` remembers on the model how to undo each splice (the blocks it registered, the forwards
it replaced, the empty attribute slots a block took); ``eject`` runs those in reverse order. The
result has the original ``state_dict`` keys, and a freshly patched model computes exactly what it
computed before ``inject``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import AttnInjectError
from .frameworks import held_model, owners
from .recipe import recipe_of, set_recipe
from .splice import Undo

_ATTRIBUTE = "_attn_inject_undo"


def record_undo(model: nn.Module, undo: Undo) -> None:
    """Remember how to take back one ``inject`` (called by ``inject`` after it succeeded)."""
    model.__dict__.setdefault(_ATTRIBUTE, []).append(undo)


def eject(model: nn.Module) -> nn.Module:
    """Remove every block ``inject`` added to ``model`` (in place); returns the model (or the framework
    object, an ultralytics ``YOLO``, whose model it is)."""
    held = held_model(model)
    if held is not None:
        eject(held[1])
        return model
    undos = model.__dict__.get(_ATTRIBUTE)
    if not undos:
        raise AttnInjectError(
            f"{type(model).__name__} holds no injected blocks to eject",
            hint="eject() takes a model patched by inject() or returned by load().",
        )
    for undo in reversed(undos):
        undo()
    del model.__dict__[_ATTRIBUTE]
    recipe = recipe_of(model)
    if recipe is not None:
        recipe = dataclasses.replace(recipe, injections=())
        set_recipe(model, recipe)
    for framework in owners(model):
        framework.recipe_changed(model, recipe)
    return model
