"""The Rule model: which patterns in a model get a block, and where the block goes.

A rule is a small YAML document (see rules/*.yaml and the README; schema.py reads it):

    name: bottleneck
    description: ResNet bottleneck - 1x1 reduce, kxk, 1x1 expand on the residual branch
    match:
      kind: residual              # residual: the learned branch of a residual add
      convs:                      # the branch's convolutions in order (omit: any branch)
        - {kernel: 1}
        - {kernel: any, depthwise: false}
        - {kernel: 1}               # an int: every spatial dim (1, 1x1, 1x1x1); a list: [h, w], [t, h, w]
    insert: branch_end            # branch_end (before the add) | block_output (after add + act)
    include: ["layer*"]           # optional globs on module paths
    exclude: []

``kind: unit`` matches conv -> norm (-> act) units and inserts after the unit (``unit_output``).
``kind: block`` matches whole modules by the convs on their main path (the branch, if the module
ends in a residual add), with or without an add, optionally by class name (``class:`` glob) and
``residual: true|false``; positions ``block_output``, ``branch_end`` (before its add, or its output
when it has none). Residual and block rules also take ``after_convN``: after the N-th conv unit of
the branch or block (its norm and activation included), N from 1, or from the end when negative
(mmcv's ``after_conv1/2/3``). ``options: {se: {...}, eca: {...}}`` carries block options the rule's
placement was published with; the caller's own options win.
Loading checks every field and names the file, line and field of any mistake.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import AttnInjectError

RuleKind = Literal["residual", "unit", "block"]
POSITIONS: dict[str, tuple[str, ...]] = {
    "residual": ("branch_end", "block_output", "after_convN"),
    "unit": ("unit_output",),
    "block": ("block_output", "branch_end", "after_convN"),
}
_AFTER_CONV = re.compile(r"^after_conv(-?[1-9][0-9]*)$")
WIDTHS = ("expand", "reduce", "same")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class ConvSpec:
    """One convolution in a rule's pattern; ``None`` fields match anything."""

    kernel: int | tuple[int, ...] | None = None  # an int: that size on every spatial dim; a tuple: one per dim
    depthwise: bool | None = None
    width: frozenset[str] | None = None  # subset of WIDTHS: out vs in channels
    optional: bool = False

    def matches(self, kernel: tuple[int, ...], depthwise: bool, in_channels: int, out_channels: int) -> bool:
        if isinstance(self.kernel, int) and any(k != self.kernel for k in kernel):
            return False
        if isinstance(self.kernel, tuple) and self.kernel != tuple(kernel):
            return False
        if self.depthwise is not None and self.depthwise != depthwise:
            return False
        if self.width is not None:
            width = "expand" if out_channels > in_channels else "reduce" if out_channels < in_channels else "same"
            if width not in self.width:
                return False
        return True


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    kind: RuleKind
    insert: str  # one of POSITIONS[kind]
    convs: tuple[ConvSpec, ...] | None = None  # residual: the branch's convs; unit: a one-spec filter
    norm: bool = True  # unit: a norm must follow the conv
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    source: str = "built-in"
    class_glob: str | None = None  # block: glob on the module's class name
    residual: bool | None = None  # block: must (True) / must not (False) end in a residual add
    options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # (block, ((option, value), ...))
    document: Any = field(default=None, compare=False, hash=False, repr=False)  # the YAML mapping it was read from

    def options_for(self, block: str) -> dict[str, Any]:
        """The block options this rule carries for ``block``."""
        return dict(dict(self.options).get(block, ()))

    def selects(self, path: str) -> bool:
        """Whether the include/exclude globs admit a module path."""
        return glob_selects(path, self.include, self.exclude)

    def with_position(self, position: str) -> Rule:
        """This rule with another insert position (checked against its kind)."""
        if not position_applies(self.kind, position):
            raise AttnInjectError(
                f"position {position!r} does not apply to rule {self.name!r} (kind {self.kind})",
                hint=f"Valid positions for {self.kind} rules: {', '.join(POSITIONS[self.kind])}"
                + (
                    " (N a conv index: 1, 2, ... or -1 for the last)." if "after_convN" in POSITIONS[self.kind] else "."
                ),
            )
        return dataclasses.replace(self, insert=position)


def conv_index(position: str) -> int | None:
    """N of an ``after_convN`` position (1-based, negative from the end); None for other positions."""
    found = _AFTER_CONV.match(position)
    return int(found.group(1)) if found else None


def position_applies(kind: str, position: str) -> bool:
    if conv_index(position) is not None:
        return "after_convN" in POSITIONS[kind]
    return position in POSITIONS[kind] and position != "after_convN"


def glob_selects(path: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(path, g) for g in include):
        return False
    return not any(fnmatch.fnmatchcase(path, g) for g in exclude)


def frozen(value: Any) -> Any:
    """YAML lists as tuples, so options can be compared and cached."""
    return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value
