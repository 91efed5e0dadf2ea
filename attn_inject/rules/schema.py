"""The schema reader: fields of a rule mapping (from a YAML file or a recipe's rule text) and of a
recipe's JSON objects, each read with a type check; every mistake names the field and where it is.

``Fields`` does the reading; its two dialects word the errors for their readers: ``RuleFields``
as ``late.yaml:5: rule 'x': field 'match.convs[0].kernel' must be ...``, ``RecipeFields`` as
``f.safetensors: recipe: recipe field 'injections[0].block' must be str, not 5``. ``parse_rule``
builds a Rule from a mapping; ``check_rule`` holds a Rule built in Python to the same constraints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..blocks import check_block_options, list_blocks
from ..errors import AttnInjectError
from .located_yaml import LocatedDict, LocatedList
from .model import NAME, POSITIONS, WIDTHS, ConvSpec, Rule, frozen, position_applies

_REQUIRED: Any = ...


class Fields:
    """Reads the fields of one mapping; subclasses word the errors."""

    def __init__(self, mapping: Mapping[str, Any], where: str, path: str):
        self.mapping, self.where, self.path = mapping, where, path

    # --- wording (the dialects) ---

    def fail(self, key: str, problem: str) -> AttnInjectError:
        raise NotImplementedError

    def missing(self, key: str) -> AttnInjectError:
        return self.fail(key, "is missing")

    def unknown(self, key: str, allowed: list[str]) -> AttnInjectError:
        return self.fail(key, f"is not a known field (expected: {', '.join(sorted(allowed))})")

    def type_names(self, kinds: tuple[type, ...]) -> str:
        return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)

    # --- reading ---

    def only(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in self.mapping:
            if key not in allowed:
                raise self.unknown(key, allowed)

    def get(self, key: str, kind: type | tuple[type, ...] | None = None, default: Any = _REQUIRED) -> Any:
        if key not in self.mapping:
            if default is _REQUIRED:
                raise self.missing(key)
            return default
        value = self.mapping[key]
        kinds = kind if isinstance(kind, tuple) else (kind,) if kind is not None else None
        if kinds is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise self.fail(key, f"must be {self.type_names(kinds)}, not {value!r}")
        return value

    def strings(self, key: str) -> list[str]:
        values = self.get(key, list, default=[])
        if not all(isinstance(v, str) for v in values):
            raise self.fail(key, "must be a list of strings")
        return values


class RuleFields(Fields):
    """A rule mapping read from YAML: errors carry the file and line, the rule's name and the dotted field."""

    mapping: LocatedDict

    def __init__(self, mapping: LocatedDict, source: str, prefix: str = "", rule: str | None = None):
        super().__init__(mapping, source, prefix)
        self.source, self.rule = source, rule

    def _rule(self) -> str:
        return f"rule {self.rule!r}: " if self.rule else ""

    def fail(self, key: str, problem: str) -> AttnInjectError:
        line = self.mapping.lines.get(key, self.mapping.line)
        return AttnInjectError(f"{self._rule()}field '{self.path}{key}' {problem}", where=f"{self.source}:{line}")

    def missing(self, key: str) -> AttnInjectError:
        return AttnInjectError(
            f"{self._rule()}missing field '{self.path}{key}'", where=f"{self.source}:{self.mapping.line}"
        )

    def unknown(self, key: str, allowed: list[str]) -> AttnInjectError:
        return self.fail(key, f"is not a known field; expected one of: {', '.join(allowed)}")

    def type_names(self, kinds: tuple[type, ...]) -> str:
        return "a " + " or ".join(t.__name__.replace("Located", "").replace("str", "string") for t in kinds)

    def sub(self, key: str, value: LocatedDict) -> RuleFields:
        return RuleFields(value, self.source, f"{self.path}{key}.", self.rule)


class RecipeFields(Fields):
    """One JSON object of a recipe: errors name the file and the field (``injections[0].block``)."""

    HINT = "The file was not written by this attn_inject or was edited."

    def __init__(self, data: Any, where: str, path: str):
        if not isinstance(data, dict):
            raise AttnInjectError(f"{path} must be a JSON object, not {type(data).__name__}", where=where)
        super().__init__(data, where, path)

    def fail(self, key: str, problem: str) -> AttnInjectError:
        return AttnInjectError(f"recipe field '{self.path}.{key}' {problem}", where=self.where, hint=self.HINT)


# ---------------------------------------------------------------------------------------------
# the constraints a rule obeys, wherever it comes from


def valid_kernel(kernel: Any) -> bool:
    """A positive int (that size on every spatial dim), or one positive int per spatial dim (1 to 3)."""
    if type(kernel) is int:
        return kernel > 0
    return isinstance(kernel, (tuple, list)) and 1 <= len(kernel) <= 3 and all(type(k) is int and k > 0 for k in kernel)


def valid_widths(widths: Any) -> bool:
    return bool(widths) and all(w in WIDTHS for w in widths)


def parse_rule(doc: LocatedDict, source: str) -> Rule:
    """Check one rule mapping against the schema and build the Rule."""
    top = RuleFields(doc, source)
    name = top.get("name", str)
    if not NAME.match(name):
        raise top.fail("name", f"must start with a letter and hold only letters, digits, '_' and '-', not {name!r}")
    top.rule = name
    top.only(["name", "description", "match", "insert", "include", "exclude", "options"])
    description = top.get("description", str, "")
    match = top.sub("match", top.get("match", LocatedDict))
    kind = match.get("kind", str, "residual")
    if kind not in POSITIONS:
        raise match.fail("kind", f"must be one of {', '.join(POSITIONS)}, not {kind!r}")
    class_glob, residual = None, None
    if kind in ("residual", "block"):
        match.only(["kind", "convs"] + (["class", "residual"] if kind == "block" else []))
        specs = match.get("convs", LocatedList, None)
        convs = None if specs is None else tuple(_conv_spec(match, i, specs) for i in range(len(specs)))
        norm = True
        class_glob = match.get("class", str, None)
        residual = match.get("residual", (bool, str), "any")
        if residual == "any":
            residual = None
        elif not isinstance(residual, bool):
            raise match.fail("residual", f"must be true, false or 'any', not {residual!r}")
    else:
        match.only(["kind", "conv", "norm"])
        conv = match.get("conv", LocatedDict, None)
        convs = None if conv is None else (_parse_conv(match.sub("conv", conv), allow_optional=False),)
        norm = match.get("norm", bool, True)
    insert = top.get("insert", str, POSITIONS[kind][0])
    if not position_applies(kind, insert):
        raise top.fail("insert", f"must be one of {', '.join(POSITIONS[kind])} for a {kind} rule, not {insert!r}")
    return Rule(
        name,
        description,
        kind,
        insert,
        convs,
        norm,
        _globs(top, "include"),
        _globs(top, "exclude"),
        source,
        class_glob,
        residual,
        _block_options(top),
        document=doc,
    )


def _block_options(top: RuleFields) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """``options: {block: {option: value}}``, each block's options checked by the block itself."""
    mapping = top.get("options", LocatedDict, LocatedDict())
    fields = top.sub("options", mapping)
    result = []
    for block in mapping:
        if block not in list_blocks():
            raise fields.fail(block, f"is not a block; expected one of: {', '.join(list_blocks())}")
        values = fields.get(block, LocatedDict)
        given = {key: frozen(value) for key, value in values.items()}
        if "init" in given:
            raise fields.sub(block, values).fail("init", "is the caller's choice (inject(..., init=...)), not a rule's")
        try:
            check_block_options(block, given)
        except AttnInjectError as exc:
            raise fields.fail(block, f"holds a bad option: {exc.what}") from None
        result.append((block, tuple(sorted(given.items()))))
    return tuple(result)


def _globs(fields: RuleFields, key: str) -> tuple[str, ...]:
    value = fields.get(key, (LocatedList, str), LocatedList())
    values = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in values):
        raise fields.fail(key, "must be a glob or a list of globs on module paths")
    return tuple(values)


def _conv_spec(match: RuleFields, index: int, specs: LocatedList) -> ConvSpec:
    spec = specs[index]
    if not isinstance(spec, LocatedDict):
        raise AttnInjectError(
            f"rule {match.rule!r}: field 'match.convs[{index}]' must be a mapping such as {{kernel: 1}}, not {spec!r}",
            where=f"{match.source}:{specs.lines[index]}",
        )
    return _parse_conv(match.sub(f"convs[{index}]", spec), allow_optional=True)


def _parse_conv(fields: RuleFields, allow_optional: bool) -> ConvSpec:
    fields.only(["kernel", "depthwise", "width"] + (["optional"] if allow_optional else []))
    kernel = fields.get("kernel", (int, str, LocatedList), "any")
    if kernel == "any":
        kernel = None
    elif isinstance(kernel, LocatedList) and valid_kernel(kernel):
        kernel = tuple(kernel)
    elif not valid_kernel(kernel):
        raise fields.fail(
            "kernel",
            f"must be a positive int, a [h, w] pair or 'any', not {kernel!r} (an int is that size on every "
            "spatial dim; 1-D and 3-D maps take [l] and [d, h, w] lists)",
        )
    depthwise = fields.get("depthwise", (bool, str), "any")
    if depthwise == "any":
        depthwise = None
    elif not isinstance(depthwise, bool):
        raise fields.fail("depthwise", f"must be true, false or 'any', not {depthwise!r}")
    width = fields.get("width", (str, LocatedList), "any")
    widths = [width] if isinstance(width, str) else list(width)
    if widths == ["any"]:
        width = None
    elif valid_widths(widths):
        width = frozenset(widths)
    else:
        raise fields.fail("width", f"must be 'any' or one or more of {', '.join(WIDTHS)}, not {width!r}")
    return ConvSpec(kernel, depthwise, width, fields.get("optional", bool, False))


def check_rule(rule: Rule) -> Rule:
    """A Rule built in Python obeys the constraints a YAML file is checked against."""
    where = f"Rule {getattr(rule, 'name', '?')!r}"

    def fail(field: str, value: Any, valid: str) -> AttnInjectError:
        return AttnInjectError(f"{where}: {field}={value!r} is not valid", hint=f"Valid: {valid}.")

    if not isinstance(rule.name, str) or not NAME.match(rule.name):
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
        if spec.kernel is not None and not (isinstance(spec.kernel, (int, tuple)) and valid_kernel(spec.kernel)):
            raise fail("ConvSpec.kernel", spec.kernel, "None, a positive int or a tuple of 1 to 3 positive ints")
        if spec.depthwise not in (None, True, False):
            raise fail("ConvSpec.depthwise", spec.depthwise, "None, True or False")
        if spec.width is not None and not (isinstance(spec.width, frozenset) and valid_widths(spec.width)):
            raise fail("ConvSpec.width", spec.width, f"None or a frozenset of {', '.join(WIDTHS)}")
    for field in ("include", "exclude"):
        value = getattr(rule, field)
        if not isinstance(value, tuple) or not all(isinstance(g, str) for g in value):
            raise fail(field, value, "a tuple of glob strings")
    if not isinstance(rule.norm, bool):
        raise fail("norm", rule.norm, "True or False")
    return rule
