"""YAML read with the line of every value, so schema errors can point at it; bounded before anything is built.

Rule files are small, hand-written and data only, so the loader is strict before it builds
anything: a regular file (not a device or a FIFO), at most MAX_BYTES of UTF-8 (read with that limit,
whatever the file's size says), nesting at most MAX_DEPTH deep, no anchors or aliases (a few hundred
bytes of nested aliases expand to billions of values), each checked on PyYAML's event stream, which
is linear in the file's size. Every problem is one AttnInjectError with file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import AttnInjectError
from ..safe_read import read_bounded


class LocatedDict(dict):
    """A YAML mapping; ``line`` is where it starts, ``lines[key]`` where each key is (1-based)."""

    line: int
    lines: dict[Any, int]


class LocatedList(list):
    """A YAML sequence; ``line`` is where it starts, ``lines[i]`` where item i starts (1-based)."""

    line: int
    lines: list[int]


MAX_BYTES = 64 * 1024
MAX_DEPTH = 16
# libyaml's parser where PyYAML was built with it: the same events, nodes and marks, ~15x faster (a
# maximal rule in a recipe parses in milliseconds rather than half a second)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_located_yaml(path: Path, source: str) -> Any:
    """Read a rule file (a regular file of at most MAX_BYTES, UTF-8) and parse it with :func:`load_located_yaml`.

    A link to a device or a FIFO is refused before anything is read (``safe_read``).
    """
    data = read_bounded(path, MAX_BYTES, "rule file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise AttnInjectError(
            f"not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})", where=f"{source}:{line}"
        ) from None
    return load_located_yaml(text, source)


def load_located_yaml(text: str, source: str) -> Any:
    """Parse one YAML document into plain values, mappings and sequences carrying line numbers."""
    if len(text) > MAX_BYTES:
        raise AttnInjectError(
            f"rule text is {len(text):,} characters; rule files are at most {MAX_BYTES:,}", where=source
        )
    try:
        _check_events(text, source)
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        if "nesting depth" in problem:  # libyaml stops at its own (larger) limit while reading ahead
            raise AttnInjectError(f"nested more than {MAX_DEPTH} levels deep", where=where) from None
        raise AttnInjectError(f"not valid YAML: {problem}", where=where) from None
    return None if node is None else _convert(node, source)


def _check_events(text: str, source: str) -> None:
    """Refuse anchors, aliases and deep nesting, reading events only (nothing is built)."""
    depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise AttnInjectError(
                "anchors and aliases (&name, *name) are not allowed in rule files; write the values out",
                where=f"{source}:{line}",
            )
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise AttnInjectError(f"nested more than {MAX_DEPTH} levels deep", where=f"{source}:{line}")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _convert(node: yaml.Node, source: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        out = LocatedDict()
        out.line, out.lines = node.start_mark.line + 1, {}
        for key_node, value_node in node.value:
            key = _convert(key_node, source)
            if key in out:
                raise AttnInjectError(f"duplicate key {key!r}", where=f"{source}:{key_node.start_mark.line + 1}")
            out[key] = _convert(value_node, source)
            out.lines[key] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = LocatedList(_convert(item, source) for item in node.value)
        seq.line, seq.lines = node.start_mark.line + 1, [item.start_mark.line + 1 for item in node.value]
        return seq
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()
