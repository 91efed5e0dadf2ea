"""Editing .safetensors files as a hostile or careless hand would, below the library's checks: the
8-byte header length, the header's JSON (text or parsed), the recipe in its metadata, tensor bytes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from attn_inject.files.container import NAMES

RECIPE = "attn_inject.recipe"


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """The header (parsed, in file order) and the data bytes of an honest file."""
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(header: dict[str, Any] | str, data: bytes) -> bytes:
    """A file from a header (a dict, or JSON text written as given, duplicates and all) and data."""
    text = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def with_metadata(raw: bytes, **changes: str | None) -> bytes:
    """``raw`` with metadata keys set (None removes one); use ``**{"attn_inject.recipe": ...}``."""
    header, data = split(raw)
    metadata = dict(header.get("__metadata__", {}))
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    return join({"__metadata__": metadata, **{k: v for k, v in header.items() if k != "__metadata__"}}, data)


def recipe_of(raw: bytes) -> dict[str, Any]:
    return json.loads(split(raw)[0]["__metadata__"][RECIPE])


def with_recipe(raw: bytes, change: Callable[[dict[str, Any]], Any]) -> bytes:
    """``raw`` with its recipe changed in place by ``change(recipe_dict)``."""
    recipe = recipe_of(raw)
    change(recipe)
    return with_metadata(raw, **{RECIPE: json.dumps(recipe)})


def with_tensor_bytes(raw: bytes, name: str, value: torch.Tensor) -> bytes:
    """``raw`` with tensor ``name``'s bytes replaced by ``value``'s (same byte count; dtype as given)."""
    header, data = split(raw)
    begin, end = header[name]["data_offsets"]
    payload = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert len(payload) == end - begin, (name, len(payload), end - begin)
    return raw[: len(raw) - len(data)] + data[:begin] + payload + data[end:]


def with_tensor(raw: bytes, name: str, value: torch.Tensor) -> bytes:
    """``raw`` with tensor ``name`` replaced by ``value`` (any dtype and shape; the offsets are redone)."""
    return map_tensors(raw, lambda key, entry, chunk: value if key == name else None)


def map_tensors(raw: bytes, change: Callable[[str, dict, bytes], torch.Tensor | None]) -> bytes:
    """``raw`` with each tensor for which ``change(name, entry, its bytes)`` gives a tensor replaced by
    that tensor (any dtype and shape); the byte ranges are laid out again."""
    header, data = split(raw)
    chunks, offset, out = [], 0, {}
    for key, entry in header.items():
        if key == "__metadata__":
            out[key] = entry
            continue
        begin, end = entry["data_offsets"]
        chunk, value = data[begin:end], change(key, entry, data[begin:end])
        if value is not None:
            chunk = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            entry = {"dtype": NAMES[value.dtype], "shape": list(value.shape)}
        chunks.append(chunk)
        out[key] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + len(chunk)]}
        offset += len(chunk)
    return join(out, b"".join(chunks))
