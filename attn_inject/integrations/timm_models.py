"""timm: a patched architecture registered as a timm model name.

``register_timm_model("resnet50_eca", base="resnet50", block="eca", after="bottleneck")`` adds an
entrypoint to timm's registry, so ``timm.create_model("resnet50_eca", ...)`` and every script built
on ``create_model`` (timm's train.py, validate.py) build the base model and inject the blocks.
``pretrained=True`` loads weights: from ``pretrained_cfg_overlay=dict(file=PATH)``, a patched file
(the blocks' tensors included, loaded strictly after the injection) or a plain checkpoint of the
base (loaded before it, so the blocks start at the identity on those weights); without a file,
the base's own pretrained weights, as timm resolves them. Files are read as tensors only.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
from timm.models import _registry, register_model  # _registry: timm has no public way to unregister
from torch import nn

from ..blocks import check_block_options
from ..errors import AttnInjectError
from ..files.checkpoints import fit_state_dict, read_state_dict
from ..rules import resolve_rules
from ..surgery.api import inject

# the module timm lists the registered entrypoints under (it appends their names to its __all__)
ENTRYPOINTS = types.ModuleType(f"{__name__}.registered", "attn_inject models registered with timm")
ENTRYPOINTS.__all__ = []  # type: ignore[attr-defined]
sys.modules[ENTRYPOINTS.__name__] = ENTRYPOINTS


def register_timm_model(name: str, base: str, block: str, after: Any, **inject_options: Any) -> str:
    """Register ``name`` as a timm model: ``base`` with ``block`` injected ``after`` (a rule name, a
    YAML path or a list), ``inject_options`` passed to ``inject`` (include, exclude, position, block
    options). Everything is checked now; returns ``name``. A name timm already has for another model
    is refused; registering one of ours again replaces it."""
    if not isinstance(name, str) or not name.isidentifier():
        raise AttnInjectError(f"a timm model name must be a Python identifier, not {name!r}")
    if timm.is_model(name) and getattr(ENTRYPOINTS, name, None) is None:
        raise AttnInjectError(f"timm already has a model called {name!r}", hint="Choose another name.")
    if not timm.is_model(base):
        raise AttnInjectError(f"unknown timm model {base!r}", hint="Name the base by its timm name (resnet50).")
    options = {k: v for k, v in inject_options.items() if k not in _INJECT_ARGUMENTS}
    check_block_options(block, options)
    resolve_rules(after)  # a bad rule name or file fails here, not at create_model
    entrypoint = _entrypoint(name, base, block, after, inject_options)
    setattr(ENTRYPOINTS, name, entrypoint)
    register_model(entrypoint)
    return name


def unregister_timm_model(name: str) -> None:
    """Take a model ``register_timm_model`` registered out of timm's registry again."""
    if getattr(ENTRYPOINTS, name, None) is None:
        raise AttnInjectError(f"{name!r} is not a model attn_inject registered with timm")
    _registry._clear_model_entries(name)
    _registry._model_entrypoints.pop(name, None)
    delattr(ENTRYPOINTS, name)
    ENTRYPOINTS.__all__.remove(name)


_INJECT_ARGUMENTS = ("include", "exclude", "position", "example_input", "verify", "stack")


def _entrypoint(name: str, base: str, block: str, after: Any, options: dict[str, Any]) -> Callable[..., nn.Module]:
    def entrypoint(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        overlay = dict(pretrained_cfg_overlay or {})
        file = overlay.pop("file", None) if pretrained else None
        model = timm.create_model(
            base,
            pretrained=pretrained and file is None,
            pretrained_cfg=pretrained_cfg,
            pretrained_cfg_overlay=overlay or None,
            **kwargs,
        )
        state = read_state_dict(file) if file is not None else None
        holds_blocks = state is not None and set(state) != set(model.state_dict())
        if state is not None and not holds_blocks:  # the base's weights: the blocks start on them
            model.load_state_dict(fit_state_dict(model, state, str(file))[0])
        inject(model, block, after, **options)
        if state is not None and holds_blocks:
            _load_patched(model, state, Path(str(file)), base, name)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = ENTRYPOINTS.__name__
    entrypoint.__doc__ = f"{base} with {block} blocks after {after!r} (attn_inject.register_timm_model)."
    return entrypoint


def _load_patched(model: nn.Module, state: dict, file: Path, base: str, name: str) -> None:
    """Load a file that is not a plain checkpoint of the base: it must hold the patched model's tensors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or bad:
        detail = f"unexpected {extra[:3]}" if extra else f"missing {missing[:3]}" if missing else f"shape of {bad[0]}"
        raise AttnInjectError(
            f"the file fits neither {base} nor {name} ({detail})",
            where=str(file),
            hint=f"Give a file saved from a {name} model, or a plain checkpoint of {base}.",
        )
    model.load_state_dict(state)
