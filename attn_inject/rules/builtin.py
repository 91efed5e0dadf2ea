"""The built-in rules (YAML files shipped as ``attn_inject.builtin_rules``) and turning ``after=``
into rules: a built-in name, a YAML path, a Rule, or a list of these."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from ..errors import AttnInjectError
from .located_yaml import LocatedDict, LocatedList, read_located_yaml
from .model import Rule
from .schema import check_rule, parse_rule


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
                hint=f"Valid built-in rules: {', '.join(sorted(builtin_rule_files()))}; "
                "or pass a path to a YAML rule file.",
            )
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AttnInjectError(f"rule {dupes[0]!r} is given more than once", hint="Name each rule once in after=.")
    return rules


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
