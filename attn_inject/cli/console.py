"""The console: all terminal output of the CLI (rich tables on stdout, warnings and errors on
stderr, --json), and library messages in the CLI's words."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..matching.plan import Plan
from ..rules import Rule

out = Console(highlight=False, soft_wrap=True)  # lines are never folded mid-word; tables fit the width
err = Console(stderr=True, highlight=False, soft_wrap=True)


def setup_logging() -> None:
    """Library warnings (e.g. keys mapped by order) go to stderr through rich."""
    handler = RichHandler(console=err, show_time=False, show_path=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def _escaped(value: Any) -> Any:
    """Every string in ``value`` (nested dicts and lists too) escaped for rich markup."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


def emit_json(payload: dict[str, Any]) -> None:
    """One strict JSON object on the last line of stdout: NaN and infinities become null."""
    out.file.write(json.dumps(_finite(payload), default=str, allow_nan=False) + "\n")
    out.file.flush()


def flag_words(message: str, field: str | None) -> str:
    """A library message naming a setting (``epochs=5``, ``num_classes``, ``resume=True``) in the
    words of the command line (``--epochs 5``, ``--num-classes``, ``--resume``); ``override=['lr']``
    becomes ``--override lr``."""
    message = re.sub(r"override=\['([\w-]+)'\]", lambda m: "--override " + m.group(1).replace("_", "-"), message)
    if not field:
        return message
    flag = "--" + field.replace("_", "-")
    spelled = {"=True": flag, "=": flag + " ", "": flag}
    return re.sub(rf"(?<![\w-])(?<!--override ){field}(=True\b|=|\b)", lambda m: spelled[m.group(1)], message)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def rules_table(rules: Iterable[Rule]) -> Table:
    table = Table(title="Built-in rules", title_justify="left")
    for column in ("rule", "kind", "insert", "description"):
        table.add_column(column)
    for rule in rules:
        table.add_row(rule.name, rule.kind, rule.insert, rule.description)
    return table


def blocks_table(rows: list[dict[str, Any]], channels: int) -> Table:
    """``attn-inject blocks``: one row per block (describe_block's fields)."""
    table = Table(title=f"Attention blocks (parameters at {channels} channels)", title_justify="left")
    for column in ("block", "paper", "options (defaults)", "identity", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for row in rows:
        options = ", ".join(f"{k}={v!r}" for k, v in row["options"].items())
        identity = "gated: alpha = 0" if row["identity"] == "gate" else f"zeroed: {', '.join(row['gate'])}"
        table.add_row(row["name"], escape(row["paper"]), escape(options), identity, f"{row['parameters']:,}")
    return table


def plan_table(plan: Plan) -> Table:
    options = ", ".join(f"{k}={v}" for k, v in plan.options)
    rules = ", ".join(r.name for r in plan.rules)
    title = f"{plan.model_class}: {plan.block}{f' ({options})' if options else ''} after {rules}"
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("#", justify="right", footer="")
    table.add_column("module", footer="total")
    table.add_column("rule")
    table.add_column("position")
    table.add_column("channels", justify="right")
    table.add_column("map (C x pooled dims)", justify="right")
    table.add_column("params added", justify="right", footer=f"{plan.params_added:,}")
    table.add_column("FLOPs added", justify="right", footer=f"{plan.flops_added:,}")
    for i, site in enumerate(plan.sites, 1):
        table.add_row(
            str(i),
            site.path or "<model>",
            site.rule,
            site.where or site.position,
            str(site.channels),
            site.map_words,
            f"{site.params:,}",
            f"{site.flops:,}",
        )
    table.caption = (
        f"{len(plan.sites)} sites · parameters {plan.params_before:,} -> {plan.params_after:,} "
        f"(+{plan.params_added:,}, +{plan.percent_added:.3f}%) · FLOPs per image +{plan.flops_added:,} "
        f"(torch FlopCounterMode at the example size)"
    )
    if plan.attended:
        done = "a block stacked on each (--stack)" if plan.stacked else "skipped (--stack adds another)"
        table.caption += f" · {len(plan.attended)} places already hold channel attention: {done}"
    table.caption_justify = "left"
    return table


class TrainingProgress:
    """Progress of ``attn_inject.finetune`` loops: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, console: Console):
        self.console = console
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.description = ""
        self.fields: dict[str, float] = {}
        self.steps = 0

    def start(self, description: str, total: int) -> None:
        self.description, self.fields, self.steps = description, {}, 0
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=True,
            )
            self.task = self.bar.add_task(description, total=total, info="")
            self.bar.start()

    def update(self, advance: int = 1, **fields: float) -> None:
        self.steps += advance
        self.fields = fields
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=advance, info=_fields(fields))

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif self.fields:
            self.console.print(f"{self.description}: {self.steps} steps · {_fields(self.fields)}", soft_wrap=True)

    def note(self, message: str) -> None:
        self.console.print(message, soft_wrap=True)


def _fields(fields: dict[str, float]) -> str:
    names = {"loss": "loss {:.4f}", "img_s": "{:.1f} img/s"}
    return " · ".join(names.get(k, k + " {:g}").format(v) for k, v in fields.items())


def patch_summary(summary: dict[str, Any]) -> Table:
    """``attn-inject patch``: what was written and how it was checked."""
    table = Table(title=f"patched {summary['input']} ({summary['arch']})", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    added = summary["params_added"]
    sites = summary["sites"]
    table.add_row("block", f"{summary['block']} after {', '.join(summary['rules'])}")
    table.add_row("sites", f"{len(sites)}: {', '.join(sites[:4])}{', …' if len(sites) > 4 else ''}")
    table.add_row("parameters", f"{summary['params_before']:,} -> {summary['params_after']:,} (+{added:,})")
    if summary["keys_mapped_by_order"]:
        table.add_row("keys", "[yellow]mapped by order and shape[/] (another implementation of the arch)")
    checked = {
        "fast": "the file read back (recipe, every tensor bit for bit); outputs equal the original's bit for bit",
        "full": "as fast, and the model rebuilt from the file with load() gives the original's outputs bit for bit",
        "none": "the file read back (recipe, every tensor bit for bit); outputs not compared (not the identity by "
        "design)",
    }[summary["verified"]]
    table.add_row("verified", f"[green]{summary['verified']}[/]: {checked} (eval, input {summary['example_input']})")
    kind = "adapter (new blocks only)" if summary["adapter_only"] else "patched model"
    table.add_row("output", f"{summary['output']} — {kind}, {summary['bytes']:,} bytes")
    return table


def data_config_text(config: dict[str, Any]) -> str:
    """timm's data config in one line: input 3×64×64 · bicubic · crop 0.875 (center) · mean … · std …"""
    size = "×".join(str(n) for n in config["input_size"])
    parts = [f"input {size}"]
    if config.get("interpolation"):
        parts.append(config["interpolation"])
    if config.get("crop_pct") is not None:
        parts.append(f"crop {config['crop_pct']:g}" + (f" ({config['crop_mode']})" if config.get("crop_mode") else ""))
    for key in ("mean", "std"):
        if config.get(key) is not None:
            parts.append(f"{key} (" + ", ".join(f"{v:.4g}" for v in config[key]) + ")")
    return " · ".join(parts)


def show_file(info: dict[str, Any]) -> None:
    """``attn-inject inspect``: the file, its recipe, and each injection's sites. Every value read
    from the file is shown as text, never as rich markup (a module named "[/x]" is just that)."""
    info = _escaped(info)
    table = Table(title=info["file"], title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("content", info["content"])
    table.add_row("size", f"{info['bytes']:,} bytes, {info['tensors']} tensors, {info['stored_values']:,} values")
    if info["arch"] is not None or info["content"] != "plain":
        table.add_row(
            "arch",
            f"{info['arch']}" + (f" (num_classes={info['num_classes']})" if info["num_classes"] is not None else ""),
        )
    if info["content"] != "plain":
        table.add_row("sites", f"{info['sites']} blocks, {info['injected_params']:,} parameters")
    if "format_version" in info:
        table.add_row(
            "format",
            f"version {info['format_version']}; written with "
            + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        )
    if info.get("base_fingerprint"):
        table.add_row("base", f"{info['base_fingerprint']}")
    if info["data_config"]:
        table.add_row("data", data_config_text(info["data_config"]))
    if info["classes"]:
        names = info["classes"]
        shown = escape(", ".join(names[:8]))
        table.add_row("classes", f"{len(names)}: {shown}{', …' if len(names) > 8 else ''}")
    out.print(table)
    for i, inj in enumerate(info.get("injections", []), 1):
        options = ", ".join(f"{k}={v}" for k, v in inj["options"].items())
        title = f"injection {i}: {inj['block']}{f' ({options})' if options else ''} after {', '.join(inj['rules'])}" + (
            f" at {inj['position']}" if inj["position"] else ""
        )
        sites = Table(title=title, title_justify="left")
        sites.add_column("#", justify="right")
        sites.add_column("module")
        for n, module in enumerate(inj["sites"], 1):
            sites.add_row(str(n), module)
        out.print(sites)
