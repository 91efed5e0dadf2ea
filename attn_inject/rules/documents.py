"""Rules as documents: a Rule's fields as the mapping the schema reads, and as YAML text that
reads back as the same rule (how rules travel inside a recipe)."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from ..errors import AttnInjectError
from .located_yaml import LocatedDict, load_located_yaml
from .model import WIDTHS, ConvSpec, Rule
from .schema import parse_rule


def rule_to_yaml(rule: Rule) -> str:
    """The rule as a YAML document that parses back (through the rule schema) to the same rule.

    A rule read from YAML keeps its document (``Rule.document``) and is written as it was; a rule
    built in Python, or changed since (``with_position``), is written from its fields. Either way
    the text is parsed back and compared, so a rule that cannot travel is refused here, not later.
    """
    candidates = []
    if rule.document is not None:
        candidates.append(_plain(rule.document))
    candidates.append(rule_document(rule))
    for doc in candidates:
        text = yaml.safe_dump(doc, sort_keys=False)
        try:
            again = rule_from_yaml(text, rule.source)
        except AttnInjectError:
            continue
        if dataclasses.replace(again, source=rule.source) == rule:
            return text
    raise AttnInjectError(
        f"rule {rule.name!r} cannot be written as YAML that reads back as the same rule",
        where=rule.source,
        hint="Define it in a YAML rule file to save the patched model.",
    )


def rule_from_yaml(text: str, where: str) -> Rule:
    doc = load_located_yaml(text, where)
    if not isinstance(doc, LocatedDict):
        raise AttnInjectError("a recipe rule must be one YAML mapping", where=where)
    return parse_rule(doc, where)


def rule_document(rule: Rule) -> dict[str, Any]:
    """A rule's fields as the mapping the rule schema reads (schema.py)."""
    match: dict[str, Any] = {"kind": rule.kind}
    if rule.kind == "unit":
        match["norm"] = rule.norm
        if rule.convs is not None:
            match["conv"] = _conv_document(rule.convs[0], with_optional=False)
    elif rule.convs is not None:
        match["convs"] = [_conv_document(c, with_optional=True) for c in rule.convs]
    if rule.kind == "block":
        if rule.class_glob is not None:
            match["class"] = rule.class_glob
        match["residual"] = "any" if rule.residual is None else rule.residual
    doc: dict[str, Any] = {
        "name": rule.name,
        "description": rule.description,
        "match": match,
        "insert": rule.insert,
        "include": list(rule.include),
        "exclude": list(rule.exclude),
    }
    if rule.options:
        doc["options"] = {block: {k: _plain(v) for k, v in values} for block, values in rule.options}
    return doc


def _conv_document(spec: ConvSpec, with_optional: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "kernel": "any" if spec.kernel is None else spec.kernel if isinstance(spec.kernel, int) else list(spec.kernel),
        "depthwise": "any" if spec.depthwise is None else spec.depthwise,
        "width": "any" if spec.width is None else [w for w in WIDTHS if w in spec.width],
    }
    if with_optional:
        doc["optional"] = spec.optional
    return doc


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
