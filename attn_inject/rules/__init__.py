"""Rules: the Rule model, the one schema reader (YAML rule files and recipes), YAML read with line
numbers, and the built-in rules."""

from .builtin import builtin_rule_files, list_rules, load_rule_file, resolve_rules
from .model import ConvSpec, Rule

__all__ = ["ConvSpec", "Rule", "builtin_rule_files", "list_rules", "load_rule_file", "resolve_rules"]
