"""Describing a file (``attn-inject inspect``): what a .safetensors file holds, read from its header
without loading tensors."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ..surgery.recipe import injected_key
from .format import file_header


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """Recipe, sites, parameter counts and versions of a patched file; tensor counts of a plain one;
    the data config and class names the file carries (``None`` where it carries none)."""
    header = file_header(path)
    values = {k: math.prod(s) for k, s in header.shapes.items()}
    info: dict[str, Any] = {
        "file": str(header.path),
        "bytes": header.path.stat().st_size,
        "tensors": len(values),
        "stored_values": sum(values.values()),
        **header.data.summary(),
    }
    recipe = header.recipe
    if recipe is None:
        return {**info, "content": "plain", "arch": None}
    if header.plain:  # a plain model saved with its arch
        return {
            **info,
            "content": "plain",
            "arch": recipe.arch,
            "num_classes": recipe.num_classes,
            "format_version": recipe.format_version,
            "versions": dict(recipe.versions),
        }
    modules = set(recipe.modules)
    injected = sum(n for k, n in values.items() if injected_key(k, modules))
    injections = [
        {
            "block": inj.block,
            "options": dict(inj.options),
            "rules": [r.name for r in inj.rules],
            "position": inj.position,
            "include": list(inj.include),
            "exclude": list(inj.exclude),
            "example_input": None if inj.input_shapes is None else [list(s) for s in inj.input_shapes],
            "sites": list(inj.modules),
            "stack": inj.stack,
        }
        | ({"example_kwargs": {k: list(s) for k, s in inj.input_kwargs}} if inj.input_kwargs else {})
        for inj in recipe.injections
    ]
    return {
        **info,
        "content": header.content,
        "arch": recipe.arch,
        "num_classes": recipe.num_classes,
        "format_version": recipe.format_version,
        "versions": dict(recipe.versions),
        "injections": injections,
        "sites": len(modules),
        "injected_params": injected,
        "base_values": None if header.content == "adapter" else info["stored_values"] - injected,
        "base_fingerprint": _parsed(header.fingerprint),
    }


def _parsed(text: str | None) -> Any:
    try:
        return None if text is None else json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text
