"""All terminal output of the CLI: rich tables on stdout, warnings and errors on stderr, --json."""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .plan import Plan
from .rules import Rule

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def setup_logging() -> None:
    """Library warnings (e.g. keys mapped by order) go to stderr through rich."""
    handler = RichHandler(console=err, show_time=False, show_path=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)


def emit_json(payload: dict[str, Any]) -> None:
    """One JSON object on the last line of stdout."""
    print(json.dumps(payload, default=str))


def rules_table(rules: Iterable[Rule]) -> Table:
    table = Table(title="Built-in rules", title_justify="left")
    for column in ("rule", "kind", "insert", "description"):
        table.add_column(column)
    for rule in rules:
        table.add_row(rule.name, rule.kind, rule.insert, rule.description)
    return table


def plan_table(plan: Plan) -> Table:
    options = ", ".join(f"{k}={v}" for k, v in plan.options)
    title = f"{plan.model_class}: {plan.block}{f' ({options})' if options else ''} after {', '.join(r.name for r in plan.rules)}"
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("#", justify="right", footer="")
    table.add_column("module", footer="total")
    table.add_column("rule")
    table.add_column("position")
    table.add_column("channels", justify="right")
    table.add_column("params added", justify="right", footer=f"{plan.params_added:,}")
    table.add_column("FLOPs added", justify="right", footer=f"{plan.flops_added:,}")
    for i, site in enumerate(plan.sites, 1):
        table.add_row(str(i), site.path or "<model>", site.rule, site.where or site.position, str(site.channels),
                      f"{site.params:,}", f"{site.flops:,}")  # fmt: skip
    table.caption = (
        f"{len(plan.sites)} sites · parameters {plan.params_before:,} -> {plan.params_after:,} "
        f"(+{plan.params_added:,}, +{plan.percent_added:.3f}%) · FLOPs per image +{plan.flops_added:,} "
        f"(torch FlopCounterMode at the example size)"
    )
    table.caption_justify = "left"
    return table


def plan_notes(plan: Plan) -> list[str]:
    notes = []
    if plan.untraced:
        paths = ", ".join(p for p, _ in plan.untraced[:3])
        notes.append(f"{len(plan.untraced)} module(s) could not be traced by torch.fx and were left as they are: {paths}")
    if plan.unreached:
        notes.append(f"{len(plan.unreached)} module(s) with convolutions were not reached by the example forward: "
                     f"{', '.join(plan.unreached[:3])}")  # fmt: skip
    if plan.misses:
        notes.append(f"{len(plan.misses)} residual add(s) were not usable, e.g. {plan.misses[0].path}: {plan.misses[0].reason}")
    return notes
