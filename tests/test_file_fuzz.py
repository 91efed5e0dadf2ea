"""File fuzzer: random edits of a real small patched file and of its adapter (the 8-byte header
length, header bytes and JSON fields, the recipe inside it, tensor bytes) read by four entry points.

Property, for every edited file: ``load``, ``inspect`` (``describe_file``), ``eject`` (``eject_file``)
and ``apply_adapter`` each either work or raise AttnInjectError: never another exception, never
longer than CASE_SECONDS, and nothing is written (the input keeps its bytes and its folder its
files; eject writes only its own output, in its own folder, and nothing when it fails). What works
gives an equal model: ``load`` holds exactly the file's tensors (names, dtypes, bits) and recipe and,
when the recipe is the original's, computes what the original model computes with those tensors;
``eject`` writes exactly the file's base tensors; ``apply_adapter`` gives the base exactly the file's
tensors, and a refused adapter leaves the base untouched.

The default run is a few fixed (derandomized) cases; the long run is
``./run tests tests/test_file_fuzz.py -m slow --hypothesis-show-statistics`` (numbers in BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from attn_inject import AttnInjectError, apply_adapter, load
from attn_inject.cli import console
from attn_inject.files.checkpoints import load_pretrained
from attn_inject.files.describe import describe_file
from attn_inject.files.eject import eject_file
from attn_inject.graph.example import bitwise_equal
from attn_inject.surgery.recipe import Recipe, injected_key, recipe_of
from tests.helpers.limits import time_limit
from tests.helpers.safetensors_edit import RECIPE, join, split
from tests.helpers.small_files import ARCH, X, write_small_files

CASE_SECONDS = 60  # per entry point; an honest load takes well under a second (BENCHMARKS.md)
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)

# ---------------------------------------------------------------------------------------------
# edits

HOSTILE_VALUES = [
    10**40, 2**63, -1, 0, 1, 3, 100_000, 100_001, 1e308, math.nan, -0.0, True, None, "", "x" * 300, [], {},
    "torchvision:resnet18", "evil.pkg:make", "resnet152", "test_efficientnet", "test_resnet", "se", "eca", "cbam",
    [[1, 3, 4096, 4096]], [[2, 3, 64, 64]], [[1, 3, 8, 8]] * 9, [[1, 3, 0, 5]], [[1, 3, 32, 32], [1, 3, 32, 32]],
    "name: r\nmatch: {kind: residual}\n", "name: u\nmatch: {kind: unit}\n", "name: d\nmatch: {kind: residual}\n"
    "include: [" + ", ".join(f'"g{i}*"' for i in range(3000)) + "]\n",
    "name: o\nmatch:\n  convs: [" + ", ".join(["{optional: true}"] * 500) + ", {kernel: 7}]\n",
    "layer1.0.se", "layer1", "", ["layer1.0.se"] * 3, {"reduction": 0}, {"kernel_size": [[1, 1], [96, 3]]},
    {"gamma": 1e-300}, "branch_end", "block_output", "after_conv-2", "after_conv99",
    json.loads("[" * 30 + "]" * 30),
]  # fmt: skip
HEADER_VALUES = {
    "dtype": ["F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "F33", "", 5, None],
    "shape": [[], [0], [1], [10**12, 10**12], [-1, 4], [1.5], [[1]], [2**63], "x", None, [1] * 40],
    "data_offsets": [[0, 0], [0, 4], [-4, 0], [0, 10**15], [4, 0], [0], None, ["0", "4"], [0.0, 4.0]],
}
METADATA_KEYS = [RECIPE, "attn_inject.content", "attn_inject.base_fingerprint", "format", "attn_inject.extra"]
METADATA_VALUES = [None, "", "model", "adapter", "plain", "{", "{}", "[]", "null", "1e999", '{"arch":1}',
                   '"' + "a" * 2000 + '"', "[" * 5000 + "]" * 5000]  # fmt: skip
FLOATS = [math.nan, math.inf, -math.inf, 3e38, 1e-45, -0.0, 0.0, 0.5, -2.0]

fraction = st.floats(0, 1, allow_nan=False, exclude_max=True)
edit = st.one_of(
    st.tuples(st.just("byte"), st.sampled_from(["length", "header", "data"]), fraction, st.integers(0, 255)),
    st.tuples(st.just("truncate"), fraction),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("length"), st.sampled_from([-8, -1, 1, 8, 1 << 20, 1 << 40, 2**64 - 1])),
    st.tuples(
        st.just("field"),
        fraction,
        st.sampled_from(sorted(HEADER_VALUES)),
        st.integers(0, 11),
    ),
    st.tuples(st.sampled_from(["duplicate", "drop", "rename"]), fraction),
    st.tuples(st.just("metadata"), st.sampled_from(METADATA_KEYS), st.sampled_from(METADATA_VALUES)),
    st.tuples(
        st.just("recipe"),
        fraction,
        st.sampled_from(["replace", "delete", "duplicate", "char"]),
        st.integers(0, len(HOSTILE_VALUES) - 1),
    ),
    st.tuples(st.just("recipe"), fraction, st.just("replace"), st.integers(0, len(HOSTILE_VALUES) - 1)),
    st.tuples(st.just("tensor"), fraction, fraction, st.sampled_from(FLOATS)),
)
# edits a file may take and still be read (other weights): the property then checks the model is equal
benign = st.one_of(
    st.tuples(st.just("tensor"), fraction, fraction, st.floats(-1e3, 1e3, allow_nan=False, width=32)),
    st.tuples(st.just("byte"), st.just("data"), fraction, st.integers(0, 255)),
)
case = st.tuples(
    st.sampled_from(["model", "model", "adapter"]), st.lists(st.one_of(edit, benign), min_size=1, max_size=2)
)


def apply_edits(raw: bytes, edits: list[tuple]) -> bytes:
    for item in edits:
        raw = EDITS[item[0]](raw, *item[1:])
    return raw


def _at(seq: list, where: float) -> Any:
    return seq[min(int(where * len(seq)), len(seq) - 1)]


def _parsed(raw: bytes) -> tuple[dict, bytes] | None:
    try:
        header, data = split(raw)
        return (header, data) if isinstance(header, dict) else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def edit_byte(raw: bytes, region: str, where: float, value: int) -> bytes:
    length = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else 0
    start, end = {"length": (0, 8), "header": (8, 8 + length), "data": (8 + length, len(raw))}[region]
    end = min(end, len(raw))
    if end <= start:
        return raw
    i = start + min(int(where * (end - start)), end - start - 1)
    return raw[:i] + bytes([value]) + raw[i + 1 :]


def edit_length(raw: bytes, delta: int) -> bytes:
    length = int.from_bytes(raw[:8], "little")
    return ((length + delta) % 2**64).to_bytes(8, "little") + raw[8:]


def edit_field(raw: bytes, where: float, field: str, index: int) -> bytes:
    parsed = _parsed(raw)
    if parsed is None or not _tensor_names(parsed[0]):
        return raw
    header, data = parsed
    entry = header[_at(_tensor_names(header), where)]
    if isinstance(entry, dict):
        values = HEADER_VALUES[field]
        entry[field] = values[index % len(values)]
    return join(header, data)


def edit_entry(kind: str):
    def edit(raw: bytes, where: float) -> bytes:
        parsed = _parsed(raw)
        if parsed is None or not _tensor_names(parsed[0]):
            return raw
        header, data = parsed
        name = _at(_tensor_names(header), where)
        if kind == "drop":
            del header[name]
            return join(header, data)
        if kind == "rename":
            header = {("layer9." + k if k == name else k): v for k, v in header.items()}
            return join(header, data)
        text = json.dumps(header, separators=(",", ":"))
        entry = json.dumps(name) + ":" + json.dumps(header[name], separators=(",", ":"))
        return join(text.replace(entry, f"{entry},{entry}", 1), data)

    return edit


def edit_metadata(raw: bytes, key: str, value: str | None) -> bytes:
    parsed = _parsed(raw)
    if parsed is None:
        return raw
    header, data = parsed
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        return raw
    if value is None:
        metadata.pop(key, None)
    else:
        metadata[key] = value
    return join(header, data)


def edit_recipe(raw: bytes, where: float, action: str, index: int) -> bytes:
    parsed = _parsed(raw)
    if parsed is None:
        return raw
    header, data = parsed
    try:
        recipe = json.loads(header["__metadata__"][RECIPE])
    except (KeyError, TypeError, ValueError, RecursionError):
        return raw
    paths = list(_paths(recipe, ()))
    if not paths:
        return raw
    path = _at(paths, where)
    parent = recipe
    for step in path[:-1]:
        parent = parent[step]
    key, value = path[-1], HOSTILE_VALUES[index]
    if action == "replace":
        parent[key] = value
    elif action == "delete":
        del parent[key]
    elif action == "duplicate" and isinstance(parent, list):
        parent.insert(key, parent[key])
    elif action == "char" and isinstance(parent[key], str) and parent[key]:
        text = parent[key]
        i = index % len(text)
        parent[key] = text[:i] + "#x:\n[&*"[index % 7] + text[i + 1 :]
    header["__metadata__"][RECIPE] = json.dumps(recipe)
    return join(header, data)


def _paths(value: Any, prefix: tuple):
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def edit_tensor(raw: bytes, which: float, where: float, value: float) -> bytes:
    parsed = _parsed(raw)
    if parsed is None:
        return raw
    header, data = parsed
    names = [k for k in _tensor_names(header) if header[k].get("dtype") in ("F32", "I64")]
    if not names:
        return raw
    entry = header[_at(names, which)]
    begin, end = entry["data_offsets"]
    size = 4 if entry["dtype"] == "F32" else 8
    count = (end - begin) // size
    if count == 0:
        return raw
    i = begin + min(int(where * count), count - 1) * size
    whole = max(-(2**63), min(2**63 - 1, int(value))) if math.isfinite(value) else -1  # an int64 buffer
    packed = struct.pack("<f", value) if size == 4 else struct.pack("<q", whole)
    offset = len(raw) - len(data)
    return raw[: offset + i] + packed + raw[offset + i + size :]


EDITS = {
    "byte": edit_byte,
    "truncate": lambda raw, where: raw[: int(where * len(raw))],
    "append": lambda raw, extra: raw + extra,
    "length": edit_length,
    "field": edit_field,
    "duplicate": edit_entry("duplicate"),
    "drop": edit_entry("drop"),
    "rename": edit_entry("rename"),
    "metadata": edit_metadata,
    "recipe": edit_recipe,
    "tensor": edit_tensor,
}

# ---------------------------------------------------------------------------------------------
# the property


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    files = write_small_files(tmp_path_factory.mktemp("honest"))
    reference = load(files["model"])
    return {**files, "recipe": recipe_of(reference).to_json()}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def timed(outcomes: dict[str, Any], name: str, action) -> Any:
    start = time.perf_counter()
    try:
        with time_limit(CASE_SECONDS):
            result = action()
        outcomes[name] = "works"
        return result
    except AttnInjectError:
        outcomes[name] = "refused"
        return None
    finally:
        outcomes[f"{name}_s"] = time.perf_counter() - start


def check_case(honest: dict, which: str, edits: list[tuple]) -> dict[str, Any]:
    """One case of the property; returns each entry point's outcome ("works" / "refused") and time."""
    raw = apply_edits(honest[which].read_bytes(), edits)
    outcomes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as root:
        folder, out = Path(root) / "in", Path(root) / "out"
        folder.mkdir()
        out.mkdir()
        path = folder / "case.safetensors"
        path.write_bytes(raw)
        before = snapshot(folder)

        info = timed(outcomes, "inspect", lambda: describe_file(path))
        if info is not None:  # what `inspect` and `inspect --json` print
            json.dumps(info)
            with console.out.capture():
                console.show_file(info)
        model = timed(outcomes, "load", lambda: load(path))
        if model is not None:
            check_loaded(honest, path, model)
        written = timed(outcomes, "eject", lambda: eject_file(path, out / "plain.safetensors"))
        if written is not None:
            check_ejected(path, out / "plain.safetensors")
        else:
            assert list(out.iterdir()) == []
        base = load_pretrained(honest["base"], ARCH)
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        patched = timed(outcomes, "apply_adapter", lambda: apply_adapter(base, path))
        if patched is not None:
            stored = load_file(path)
            assert all(bitwise_equal(base.state_dict()[k], v) for k, v in stored.items())
            assert set(base.state_dict()) == set(base_state) | set(stored)
        else:
            assert base.state_dict().keys() == base_state.keys()
            assert all(bitwise_equal(base.state_dict()[k], v) for k, v in base_state.items())
            assert recipe_of(base).injections == ()
        assert snapshot(folder) == before  # nothing written next to the input, the input unchanged
    return outcomes


def check_loaded(honest: dict, path: Path, model: torch.nn.Module) -> None:
    stored = load_file(path)
    state = model.state_dict()
    assert set(state) == set(stored)
    assert all(bitwise_equal(state[k], v) for k, v in stored.items())
    assert recipe_of(model).to_json() == Recipe.from_json(stored_recipe(path)).to_json()
    if recipe_of(model).to_json() == honest["recipe"]:
        reference = load(honest["model"])
        reference.load_state_dict(stored)
        with torch.no_grad():
            assert bitwise_equal(model(X), reference(X))


def check_ejected(path: Path, written: Path) -> None:
    """The ejected file holds exactly the file's tensors that are not the injected blocks'."""
    stored, plain = load_file(path), load_file(written)
    modules = set(Recipe.from_json(stored_recipe(path)).modules)
    assert set(plain) == {k for k in stored if not injected_key(k, modules)}
    assert all(bitwise_equal(plain[k], stored[k]) for k in plain)


def stored_recipe(path: Path) -> str:
    return split(path.read_bytes())[0]["__metadata__"][RECIPE]


TIME_BUCKETS = (0.1, 0.5, 1, 2, 5)


def record(outcomes: dict[str, Any]) -> None:
    """Each entry point's outcome and time (in buckets), for --hypothesis-show-statistics."""
    for name in ("inspect", "load", "eject", "apply_adapter"):
        event(f"{name}: {outcomes[name]}")
        seconds = outcomes[f"{name}_s"]
        bucket = next((f"< {b} s" for b in TIME_BUCKETS if seconds < b), f">= {TIME_BUCKETS[-1]} s")
        event(f"{name} took {bucket}")


@settings(max_examples=10, derandomize=True, **SETTINGS)
@given(which_and_edits=case)
def test_edited_files_load_equal_or_are_refused_cleanly(honest, which_and_edits):
    record(check_case(honest, *which_and_edits))


@pytest.mark.slow
@settings(max_examples=1000, derandomize=False, **SETTINGS)
@given(which_and_edits=case)
def test_edited_files_load_equal_or_are_refused_cleanly_long(honest, which_and_edits):
    record(check_case(honest, *which_and_edits))


def test_the_honest_files_pass_the_property(honest):
    """The premise: unedited, every entry point works (and the edits above are what makes them refuse)."""
    assert check_case(honest, "model", [])["load"] == "works"
    outcomes = check_case(honest, "adapter", [])
    assert (outcomes["apply_adapter"], outcomes["load"], outcomes["eject"]) == ("works", "refused", "refused")
