"""Rules: which patterns in a model get a block, and where the block goes.

A rule is a small YAML document (see rules/*.yaml and the README):

    name: bottleneck
    description: ResNet bottleneck - 1x1 reduce, kxk, 1x1 expand on the residual branch
    match:
      kind: residual              # residual: the learned branch of a residual add
      convs:                      # the branch's convolutions in order (omit: any branch)
        - {kernel: 1}
        - {kernel: any, depthwise: false}
        - {kernel: 1}
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

import fnmatch
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import AttnInjectError
from .located_yaml import LocatedDict, LocatedList, read_located_yaml

POSITIONS = {
    "residual": ("branch_end", "block_output", "after_convN"),
    "unit": ("unit_output",),
    "block": ("block_output", "branch_end", "after_convN"),
}
_AFTER_CONV = re.compile(r"^after_conv(-?[1-9][0-9]*)$")
WIDTHS = ("expand", "reduce", "same")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class ConvSpec:
    """One convolution in a rule's pattern; ``None`` fields match anything."""

    kernel: tuple[int, int] | None = None
    depthwise: bool | None = None
    width: frozenset[str] | None = None  # subset of WIDTHS: out vs in channels
    optional: bool = False

    def matches(self, kernel: tuple[int, int], depthwise: bool, in_channels: int, out_channels: int) -> bool:
        if self.kernel is not None and self.kernel != kernel:
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
    kind: str  # "residual" | "unit"
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
                + (" (N a conv index: 1, 2, ... or -1 for the last)." if "after_convN" in POSITIONS[self.kind] else "."),
            )
        return Rule(**{**self.__dict__, "insert": position})


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


# ---------------------------------------------------------------------------------------------
# lookup


def builtin_rule_files() -> dict[str, Path]:
    """Built-in rule name -> its YAML file (shipped in the wheel as ``attn_inject.builtin_rules``)."""
    folder = resources.files("attn_inject.builtin_rules")
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith(".yaml")}


def list_rules() -> list[Rule]:
    """The built-in rules, sorted by name."""
    return [r for _, f in sorted(builtin_rule_files().items()) for r in load_rule_file(f, builtin=True)]


def resolve_rules(after: str | Path | Rule | Iterable[str | Path | Rule]) -> list[Rule]:
    """Turn ``after=`` (a built-in name, a YAML path, a Rule, or a list of these) into rules."""
    items = [after] if isinstance(after, (str, Path, Rule)) else None
    if items is None and isinstance(after, Iterable) and not isinstance(after, (bytes, dict)):
        items = list(after)
    if items is None or not all(isinstance(i, (str, Path, Rule)) for i in items):
        raise AttnInjectError(
            f"after= must be a rule name, a YAML rule file, a Rule or a list of these, not {after!r}",
            hint=f"Valid built-in rules: {', '.join(sorted(builtin_rule_files()))}.",
        )
    if not items:
        raise AttnInjectError("after= is empty", hint=f"Give a rule: {', '.join(builtin_rule_files())}.")
    rules: list[Rule] = []
    for item in items:
        if isinstance(item, Rule):
            rules.append(check_rule(item))
        elif isinstance(item, (str, Path)) and _looks_like_path(item):
            rules.extend(load_rule_file(Path(item)))
        elif isinstance(item, str) and item in builtin_rule_files():
            rules.extend(load_rule_file(builtin_rule_files()[item], builtin=True))
        else:
            raise AttnInjectError(
                f"unknown rule {item!r}",
                hint=f"Valid built-in rules: {', '.join(sorted(builtin_rule_files()))}; or pass a path to a YAML rule file.",
            )
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AttnInjectError(f"rule {dupes[0]!r} is given more than once", hint="Name each rule once in after=.")
    return rules


def check_rule(rule: Rule) -> Rule:
    """A Rule built in Python obeys the schema a YAML file is checked against."""
    where = f"Rule {getattr(rule, 'name', '?')!r}"

    def fail(field: str, value: Any, valid: str) -> AttnInjectError:
        return AttnInjectError(f"{where}: {field}={value!r} is not valid", hint=f"Valid: {valid}.")

    if not isinstance(rule.name, str) or not _NAME.match(rule.name):
        raise fail("name", rule.name, "a string of letters, digits, '_' and '-' starting with a letter")
    if rule.kind not in POSITIONS:
        raise fail("kind", rule.kind, ", ".join(POSITIONS))
    if not isinstance(rule.insert, str) or not position_applies(rule.kind, rule.insert):
        raise fail("insert", rule.insert, f"{', '.join(POSITIONS[rule.kind])} for a {rule.kind} rule")
    if rule.class_glob is not None and not isinstance(rule.class_glob, str):
        raise fail("class_glob", rule.class_glob, "None or a glob on class names")
    if rule.residual not in (None, True, False):
        raise fail("residual", rule.residual, "None, True or False")
    if not isinstance(rule.options, tuple) or not all(
        isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str) and isinstance(o[1], tuple) for o in rule.options
    ):
        raise fail("options", rule.options, "a tuple of (block, ((option, value), ...)) pairs")
    if rule.convs is not None and not (
        isinstance(rule.convs, tuple) and all(isinstance(c, ConvSpec) for c in rule.convs)
    ):
        raise fail("convs", rule.convs, "None or a tuple of ConvSpec")
    for spec in rule.convs or ():
        kernel_ok = spec.kernel is None or (
            isinstance(spec.kernel, tuple) and len(spec.kernel) == 2 and all(type(k) is int and k > 0 for k in spec.kernel)
        )
        if not kernel_ok:
            raise fail("ConvSpec.kernel", spec.kernel, "None or a (height, width) pair of positive ints")
        if spec.depthwise not in (None, True, False):
            raise fail("ConvSpec.depthwise", spec.depthwise, "None, True or False")
        if spec.width is not None and not (isinstance(spec.width, frozenset) and spec.width and spec.width <= set(WIDTHS)):
            raise fail("ConvSpec.width", spec.width, f"None or a frozenset of {', '.join(WIDTHS)}")
    for field in ("include", "exclude"):
        value = getattr(rule, field)
        if not isinstance(value, tuple) or not all(isinstance(g, str) for g in value):
            raise fail(field, value, "a tuple of glob strings")
    if not isinstance(rule.norm, bool):
        raise fail("norm", rule.norm, "True or False")
    return rule


def _looks_like_path(item: str | Path) -> bool:
    text = str(item)
    return isinstance(item, Path) or text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text


def load_rule_file(path: Path, builtin: bool = False) -> list[Rule]:
    """Read and check one YAML file holding a rule (a mapping) or several (a list of mappings)."""
    source = f"built-in rule {path.stem}" if builtin else str(path)
    doc = read_located_yaml(path, source)
    if isinstance(doc, LocatedDict):
        return [parse_rule(doc, source)]
    if isinstance(doc, LocatedList) and doc and all(isinstance(d, LocatedDict) for d in doc):
        return [parse_rule(d, source) for d in doc]
    raise AttnInjectError(
        "a rule file holds one rule (a mapping with name, match, insert) or a list of them",
        where=f"{source}:{getattr(doc, 'line', 1)}",
    )


# ---------------------------------------------------------------------------------------------
# schema


class _Fields:
    """Reads fields of one YAML mapping, reporting the file, line and dotted field on error."""

    def __init__(self, mapping: LocatedDict, source: str, prefix: str, rule: str | None):
        self.mapping, self.source, self.prefix, self.rule = mapping, source, prefix, rule

    def fail(self, key: str, what: str) -> AttnInjectError:
        line = self.mapping.lines.get(key, self.mapping.line)
        field = f"{self.prefix}{key}"
        rule = f"rule {self.rule!r}: " if self.rule else ""
        return AttnInjectError(f"{rule}field '{field}' {what}", where=f"{self.source}:{line}")

    def only(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in self.mapping:
            if key not in allowed:
                raise self.fail(key, f"is not a known field; expected one of: {', '.join(allowed)}")

    def get(self, key: str, default: Any = ..., kind: type | tuple[type, ...] | None = None) -> Any:
        if key not in self.mapping:
            if default is ...:
                rule = f"rule {self.rule!r}: " if self.rule else ""
                raise AttnInjectError(f"{rule}missing field '{self.prefix}{key}'", where=f"{self.source}:{self.mapping.line}")
            return default
        value = self.mapping[key]
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind)):
            names = " or ".join(t.__name__.replace("Located", "").replace("str", "string") for t in _as_tuple(kind))
            raise self.fail(key, f"must be a {names}, not {value!r}")
        return value

    def sub(self, key: str, value: LocatedDict) -> _Fields:
        return _Fields(value, self.source, f"{self.prefix}{key}.", self.rule)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def parse_rule(doc: LocatedDict, source: str) -> Rule:
    """Check one rule mapping against the schema and build the Rule."""
    top = _Fields(doc, source, "", None)
    name = top.get("name", kind=str)
    if not _NAME.match(name):
        raise top.fail("name", f"must start with a letter and hold only letters, digits, '_' and '-', not {name!r}")
    top.rule = name
    top.only(["name", "description", "match", "insert", "include", "exclude", "options"])
    description = top.get("description", "", kind=str)
    match = top.sub("match", top.get("match", kind=LocatedDict))
    kind = match.get("kind", "residual", kind=str)
    if kind not in POSITIONS:
        raise match.fail("kind", f"must be one of {', '.join(POSITIONS)}, not {kind!r}")
    class_glob, residual = None, None
    if kind in ("residual", "block"):
        match.only(["kind", "convs"] + (["class", "residual"] if kind == "block" else []))
        specs = match.get("convs", None, kind=LocatedList)
        convs = None if specs is None else tuple(_conv_spec(match, f"convs[{i}]", s, i, specs) for i, s in enumerate(specs))
        norm = True
        class_glob = match.get("class", None, kind=str)
        residual = match.get("residual", "any", kind=(bool, str))
        if residual == "any":
            residual = None
        elif not isinstance(residual, bool):
            raise match.fail("residual", f"must be true, false or 'any', not {residual!r}")
    else:
        match.only(["kind", "conv", "norm"])
        conv = match.get("conv", None, kind=LocatedDict)
        convs = None if conv is None else (_parse_conv(match.sub("conv", conv), allow_optional=False),)
        norm = match.get("norm", True, kind=bool)
    insert = top.get("insert", POSITIONS[kind][0], kind=str)
    if not position_applies(kind, insert):
        raise top.fail("insert", f"must be one of {', '.join(POSITIONS[kind])} for a {kind} rule, not {insert!r}")
    include = _globs(top, "include")
    exclude = _globs(top, "exclude")
    options = _block_options(top)
    return Rule(name, description, kind, insert, convs, norm, include, exclude, source, class_glob, residual, options,
                document=doc)  # fmt: skip


def _block_options(top: _Fields) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """``options: {block: {option: value}}``, each block's options checked by the block itself."""
    from .blocks import check_block_options, get_block
    from .blocks.registry import list_blocks

    mapping = top.get("options", LocatedDict(), kind=LocatedDict)
    fields = top.sub("options", mapping)
    result = []
    for block, values in mapping.items():
        if block not in list_blocks():
            raise fields.fail(block, f"is not a block; expected one of: {', '.join(list_blocks())}")
        values = fields.get(block, kind=LocatedDict)
        given = {key: frozen(value) for key, value in values.items()}
        if "init" in given:
            raise fields.sub(block, values).fail("init", "is the caller's choice (inject(..., init=...)), not a rule's")
        try:
            check_block_options(block, given)
            with torch.device("meta"):
                get_block(block)(8, **given)
        except AttnInjectError as exc:
            raise fields.fail(block, f"holds a bad option: {exc.what}") from None
        except TypeError as exc:
            raise fields.fail(block, f"holds a bad option: {exc}") from None
        result.append((block, tuple(sorted(given.items()))))
    return tuple(result)


def frozen(value: Any) -> Any:
    """YAML lists as tuples, so options can be compared and cached."""
    return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _globs(fields: _Fields, key: str) -> tuple[str, ...]:
    value = fields.get(key, LocatedList(), kind=(LocatedList, str))
    values = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in values):
        raise fields.fail(key, "must be a glob or a list of globs on module paths")
    return tuple(values)


def _conv_spec(match: _Fields, key: str, spec: Any, index: int, specs: LocatedList) -> ConvSpec:
    if not isinstance(spec, LocatedDict):
        line = specs.lines[index]
        raise AttnInjectError(
            f"rule {match.rule!r}: field 'match.{key}' must be a mapping such as {{kernel: 1}}, not {spec!r}",
            where=f"{match.source}:{line}",
        )
    return _parse_conv(match.sub(key, spec), allow_optional=True)


def _parse_conv(fields: _Fields, allow_optional: bool) -> ConvSpec:
    allowed = ["kernel", "depthwise", "width"] + (["optional"] if allow_optional else [])
    fields.only(allowed)
    kernel = fields.get("kernel", "any", kind=(int, str, LocatedList))
    if kernel == "any":
        kernel = None
    elif isinstance(kernel, int) and kernel > 0:
        kernel = (kernel, kernel)
    elif isinstance(kernel, LocatedList) and len(kernel) == 2 and all(type(k) is int and k > 0 for k in kernel):
        kernel = (kernel[0], kernel[1])
    else:
        raise fields.fail("kernel", f"must be a positive int, a [h, w] pair or 'any', not {kernel!r}")
    depthwise = fields.get("depthwise", "any", kind=(bool, str))
    if depthwise == "any":
        depthwise = None
    elif not isinstance(depthwise, bool):
        raise fields.fail("depthwise", f"must be true, false or 'any', not {depthwise!r}")
    width = fields.get("width", "any", kind=(str, LocatedList))
    widths = [width] if isinstance(width, str) else list(width)
    if widths == ["any"]:
        width = None
    elif widths and all(w in WIDTHS for w in widths):
        width = frozenset(widths)
    else:
        raise fields.fail("width", f"must be 'any' or one or more of {', '.join(WIDTHS)}, not {width!r}")
    optional = fields.get("optional", False, kind=bool)
    return ConvSpec(kernel, depthwise, width, optional)
