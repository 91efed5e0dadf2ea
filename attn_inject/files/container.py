"""The .safetensors container as attn_inject reads and writes it: the header parsed with bounds and
without duplicate names before any tensor is read, and a writer whose header has one canonical order.

Reading: the 8-byte header length is checked against MAX_HEADER_BYTES and the file's size before the
header is read; the header must be a JSON object naming each tensor once (a duplicate is refused,
not silently overwritten), at most MAX_TENSORS of them, each with a known dtype, a shape whose size
matches its byte range, and byte ranges that tile the data exactly. So the bytes the tensors take
are at most the file's size, and everything is known before anything is allocated for them.

Writing: ``__metadata__`` first with its keys sorted (a value that is not a string is written as
canonical JSON: sorted keys, no spaces), then the tensors, largest element size first and by name
within a size (so every tensor stays aligned); the same tensors and metadata always give the same
bytes (safetensors' own writer orders the metadata by a per-process hash).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import AttnInjectError
from ..safe_read import open_regular, read_errors, read_exactly_at_most
from ..surgery.recipe import canonical_json

MAX_HEADER_BYTES = 8 << 20  # a ResNet-50 file's header is ~40 kB; safetensors itself allows 100 MB
MAX_TENSORS = 50_000  # the largest timm models hold a few thousand
MAX_DIMS = 16
METADATA = "__metadata__"

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor as the header describes it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class RawHeader:
    """A checked .safetensors header: its metadata (strings) and its tensors, in the file's order."""

    metadata: dict[str, str]
    tensors: dict[str, Entry]


def read_header(path: str | os.PathLike) -> RawHeader:
    """The header of a .safetensors file, checked; any problem is one AttnInjectError naming the file."""
    with open_regular(path, "the .safetensors file") as handle, read_errors(path, "the .safetensors file"):
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise damaged(path, f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(handle.read(8), "little")
        if length > MAX_HEADER_BYTES:
            raise damaged(
                path,
                f"a header of {length:,} bytes; attn_inject reads headers of at most {MAX_HEADER_BYTES:,}",
            )
        if 8 + length > size:
            raise damaged(path, f"a header of {length:,} bytes in a file of {size:,}")
        raw = read_exactly_at_most(handle, length)
    return _parse(raw, size - 8 - length, path)


def _parse(raw: bytes, data_bytes: int, path: str | os.PathLike) -> RawHeader:
    try:
        top = json.loads(raw.decode("utf-8"), object_pairs_hook=_Pairs, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise damaged(path, "the header is not UTF-8") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise damaged(path, f"the header is not JSON: {exc}") from None
    except RecursionError:
        raise damaged(path, "the header is nested too deeply") from None
    if not isinstance(top, _Pairs):
        raise damaged(path, "the header is not a JSON object")
    items = _unique(top, "the header names {!r} twice", path)
    metadata: dict[str, str] = {}
    if METADATA in items:
        pairs = items.pop(METADATA)
        if not isinstance(pairs, _Pairs):
            raise damaged(path, "the header's __metadata__ is not an object")
        metadata = _unique(pairs, "the header's metadata names {!r} twice", path)
        if not all(isinstance(v, str) for v in metadata.values()):
            raise damaged(path, "a metadata value is not a string")
    if len(items) > MAX_TENSORS:
        raise damaged(path, f"{len(items):,} tensors; attn_inject reads files of at most {MAX_TENSORS:,}")
    tensors = {name: _entry(name, value, path) for name, value in items.items()}
    _check_tiling(tensors, data_bytes, path)
    return RawHeader(metadata, tensors)


class _Pairs(list):
    """A JSON object as the list of its (key, value) pairs, so duplicate keys can be told."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique(pairs: _Pairs, problem: str, path: str | os.PathLike) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise damaged(path, problem.format(key))
        out[key] = value
    return out


def _entry(name: str, value: Any, path: str | os.PathLike) -> Entry:
    fields = _unique(value, f"tensor {name!r} names {{!r}} twice", path) if isinstance(value, _Pairs) else None
    if fields is None or set(fields) != {"dtype", "shape", "data_offsets"}:
        raise damaged(path, f"tensor {name!r} is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    if dtype not in DTYPES:
        raise damaged(path, f"tensor {name!r} has the unknown dtype {str(dtype)[:20]!r}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_natural(n) for n in shape)):
        raise damaged(path, f"tensor {name!r} has the shape {str(shape)[:60]}, not a list of at most {MAX_DIMS} sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(n) for n in offsets)):
        raise damaged(path, f"tensor {name!r} has the byte range {str(offsets)[:60]}, not two offsets")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise damaged(path, f"tensor {name!r} of shape {shape} and dtype {dtype} spans {end - begin} bytes")
    return Entry(DTYPES[dtype], tuple(shape), begin, end)


def _natural(n: Any) -> bool:
    return type(n) is int and n >= 0


def _check_tiling(tensors: dict[str, Entry], data_bytes: int, path: str | os.PathLike) -> None:
    """The byte ranges follow each other from 0 to the end of the file, without gaps or overlaps."""
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise damaged(path, f"tensor {name!r} starts at byte {entry.begin} of the data, not {position}")
        position = entry.end
    if position != data_bytes:
        raise damaged(path, f"the tensors take {position:,} bytes of the data; the file holds {data_bytes:,}")


def damaged(path: str | os.PathLike, problem: str) -> AttnInjectError:
    return AttnInjectError(
        f"not a valid .safetensors file ({problem})",
        where=str(path),
        hint="The file is truncated or damaged; write it again.",
    )


# ---------------------------------------------------------------------------------------------
# writing


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write ``tensors`` (contiguous, not sharing memory) and ``metadata`` as a .safetensors file at
    ``path``, in the canonical order (see the module docstring). OSError on a failed write."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA] = {k: v if isinstance(v, str) else canonical_json(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with create(path) as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for name in order:
            write_tensor(handle, tensors[name])


def create(path: Path) -> BinaryIO:
    """The file a writer writes into (a test points this at /dev/full to fill the disk)."""
    return open(path, "wb")


def write_tensor(handle: BinaryIO, tensor: torch.Tensor) -> None:
    """A tensor's bytes, little-endian, as safetensors stores them."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if sys.byteorder == "big" and flat.element_size() > 1:
        handle.write(flat.view(_SAME_WIDTH[flat.element_size()]).numpy().byteswap().tobytes())
    else:
        handle.write(flat.view(torch.uint8).numpy().data)


_SAME_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}
