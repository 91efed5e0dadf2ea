"""Hugging Face transformers: a patched model's ``save_pretrained`` folder carries its recipe, and
``load(folder)`` / ``from_pretrained(folder)`` rebuild it with the blocks.

Whenever inject (or eject, or a replay) changes a transformers model's recipe, the recipe is also
set on its config as ``config.attn_inject`` (the recipe's JSON object). ``save_pretrained`` writes
the config, so config.json holds the recipe beside the weights (which hold the blocks' tensors). The
Trainer's checkpoints are ``save_pretrained`` folders, and its resume loads them into the model it
holds, which is the patched one: the blocks are kept.

Rebuilding reads config.json as JSON and the weights as tensors; the model class is the one the
config names in ``architectures``, looked up in the transformers package itself (a name, never
code: a config that asks for remote code, ``auto_map``, is refused).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import AttnInjectError
from ..files.checkpoints import read_state_dict
from ..files.saving import replay
from ..surgery.recipe import Recipe

_PRETRAINED = "transformers.modeling_utils.PreTrainedModel"
CONFIG_KEY = "attn_inject"  # the recipe's key in config.json


def is_transformers_model(model: Any) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == _PRETRAINED for c in type(model).__mro__)


def recipe_changed(model: nn.Module, recipe: Recipe | None) -> None:
    """Keep the recipe on the model's config, where ``save_pretrained`` writes it."""
    config = getattr(model, "config", None)
    if config is None:
        return
    if recipe is not None and recipe.injections:
        setattr(config, CONFIG_KEY, json.loads(recipe.to_json()))
    elif hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)


def load_folder(path: Path, device: torch.device, dtype: torch.dtype | None) -> nn.Module | None:
    """A patched model's ``save_pretrained`` folder as the model (``load``); None for paths that are no
    such folder (a folder with a config.json that holds no recipe is refused)."""
    settings = _patched_config(path)
    if settings is None:
        if path.is_dir() and (path / "config.json").is_file():
            raise AttnInjectError(
                "the folder's config.json holds no attn_inject recipe: not a patched model",
                where=str(path),
                hint="Load a plain model with transformers' from_pretrained; a patched one saves its recipe with "
                "save_pretrained().",
            )
        return None
    cls = _model_class(settings, path)
    model = cls(cls.config_class.from_dict(settings))
    _replay(model, settings, path)
    _load_weights(model, path)
    model.to(device)
    return (model.to(dtype) if dtype is not None else model).eval()


def from_pretrained(path: str | Path, cls: Any = None, **kwargs: Any) -> nn.Module:
    """transformers' ``from_pretrained`` for a patched model's folder: the base model is loaded by
    ``cls.from_pretrained(path, **kwargs)`` (``cls``: the class config.json names), with all of its
    options (``dtype``, ...); then the recipe is replayed and the blocks' tensors are loaded from the
    folder. transformers' own report lists the blocks' tensors as unused: they are loaded here."""
    path = Path(path)
    settings = _patched_config(path)
    if settings is None:
        raise AttnInjectError(
            "not the folder of a patched model (config.json holds no attn_inject recipe)",
            where=str(path),
            hint="Use transformers' from_pretrained for a plain model; save a patched one with save_pretrained().",
        )
    model = (cls or _model_class(settings, path)).from_pretrained(str(path), **kwargs)
    recipe = _replay(model, settings, path)
    blocks = set(recipe.modules)
    tensors = {k: v for k, v in _weights(path).items() if _under(k, blocks)}
    _load(model, tensors, path, only=blocks)
    return model


def _patched_config(path: Path) -> dict | None:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return None
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AttnInjectError(f"config.json is not valid JSON ({exc})", where=str(config)) from None
    return settings if isinstance(settings, dict) and CONFIG_KEY in settings else None


def _model_class(settings: dict, path: Path) -> Any:
    import transformers

    if "auto_map" in settings:
        raise AttnInjectError(
            "the config asks for custom model code (auto_map), which attn_inject never imports",
            where=str(path / "config.json"),
            hint="Build the model yourself and pass it as cls= to from_pretrained.",
        )
    names = settings.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if not (isinstance(cls, type) and any(f"{c.__module__}.{c.__qualname__}" == _PRETRAINED for c in cls.__mro__)):
        raise AttnInjectError(
            f"the config names no transformers model class ({names!r})",
            where=str(path / "config.json"),
            hint="Pass the class: from_pretrained(path, cls=MyModelClass).",
        )
    return cls


def _replay(model: nn.Module, settings: dict, path: Path) -> Recipe:
    recipe = Recipe.from_json(json.dumps(settings[CONFIG_KEY]), str(path / "config.json"))
    replay(model, recipe, str(path))
    return recipe


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors: model.safetensors, its shards, or pytorch_model.bin (tensors only)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(path / Path(shard).name)).items()}
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return read_state_dict(path / "pytorch_model.bin")
    raise AttnInjectError("the folder holds no weights (model.safetensors)", where=str(path))


def _load_weights(model: nn.Module, path: Path) -> None:
    _load(model, _weights(path), path)


def _under(key: str, modules: set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _load(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, only: set[str] | None = None) -> None:
    """Load strictly: every key the model has (or, with ``only``, every key of those modules)."""
    expected = {k for k in model.state_dict() if only is None or _under(k, only)}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise AttnInjectError(
            f"the folder's weights do not fit the model its recipe builds: missing {missing[:3]}, "
            f"unexpected {extra[:3]}",
            where=str(path),
            hint="The folder was written by another model or edited; save it again with save_pretrained().",
        )
    model.load_state_dict(tensors, strict=only is None)
