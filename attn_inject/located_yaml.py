"""YAML loading that remembers the line of every value, so schema errors can point at it."""

from __future__ import annotations

from typing import Any

import yaml

from .errors import AttnInjectError


class LocatedDict(dict):
    """A YAML mapping; ``line`` is where it starts, ``lines[key]`` where each key is (1-based)."""

    line: int
    lines: dict[Any, int]


class LocatedList(list):
    """A YAML sequence; ``line`` is where it starts, ``lines[i]`` where item i starts (1-based)."""

    line: int
    lines: list[int]


def load_located_yaml(text: str, source: str) -> Any:
    """Parse one YAML document into plain values, mappings and sequences carrying line numbers."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise AttnInjectError(f"not valid YAML: {problem}", where=where) from None
    return None if node is None else _convert(node, source)


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


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()
