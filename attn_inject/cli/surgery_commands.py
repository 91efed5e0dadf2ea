"""``attn-inject rules | plan | patch``: the built-in rules, a dry run, and patching a checkpoint file."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import AttnInjectError
from ..files.arch import create_model
from ..files.patch import VERIFY_MODES, PatchReport, patch_checkpoint
from ..integrations.yolo_checkpoints import is_yolo_checkpoint, patch_yolo_checkpoint
from ..rules import list_rules
from ..surgery.api import plan
from . import console
from .arguments import (
    EPILOG,
    add_model_arguments,
    add_surgery_arguments,
    block_options,
    check_one_size,
    example_input,
    rule_names,
)


def add_parsers(commands: Any) -> None:
    rules = commands.add_parser("rules", help="list the built-in rules", epilog=EPILOG)
    rules.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    rules.set_defaults(run=run_rules)

    dry_run = commands.add_parser(
        "plan",
        help="show where blocks would go (a dry run)",
        epilog=EPILOG,
        description="Build ARCH untrained and show the sites a block would be spliced into, with the parameters "
        "and FLOPs added.",
    )
    add_model_arguments(dry_run)
    add_surgery_arguments(dry_run)
    dry_run.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    dry_run.set_defaults(run=run_plan)

    patch = commands.add_parser(
        "patch",
        help="patch a checkpoint file and write .safetensors with the recipe (or an ultralytics .pt)",
        epilog=EPILOG,
        description="Read a plain checkpoint (.pth/.pt/.bin read with torch.load(weights_only=True), or "
        ".safetensors; state_dict/model/state_dict_ema wrappers, module./_orig_mod. prefixes), inject, write "
        "OUTPUT atomically with the recipe in its metadata, and verify the written file before reporting success. "
        "An ultralytics .pt (a pickled YOLO model) is read as data, never unpickled: its architecture comes from "
        "the bundled YAML it names, and OUTPUT may be a .pt that ultralytics opens (YOLO(OUT)) and, with "
        "attn_inject.keep_blocks, trains with the blocks.",
    )
    patch.add_argument("checkpoint", metavar="IN", help="the checkpoint to patch (never changed)")
    add_model_arguments(patch, arch_required=False)
    add_surgery_arguments(patch)
    patch.add_argument(
        "--output", "-o", required=True, metavar="OUT", help="the .safetensors file to write (.pt: ultralytics input)"
    )
    patch.add_argument("--force", action="store_true", help="replace OUT if it exists")
    patch.add_argument(
        "--adapter-only",
        action="store_true",
        help="write only the new blocks, the recipe and a fingerprint of the base weights",
    )
    patch.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="fast",
        help="fast: read the file back (recipe, every tensor bit for bit) and check the patched model's output "
        "equals the original's; full: also rebuild the model from the file with load() and check its output; "
        "none: read the file back but compare no outputs, for blocks not the identity by design (init=paper) "
        "(default: fast)",
    )
    patch.add_argument("--json", action="store_true", help="print one JSON object at the end")
    patch.set_defaults(run=run_patch)


def run_rules(args: argparse.Namespace) -> int:
    rules = list_rules()
    if args.json:
        rows = [{"name": r.name, "kind": r.kind, "insert": r.insert, "description": r.description} for r in rules]
        console.emit_json({"rules": rows})
    else:
        console.out.print(console.rules_table(rules))
    return 0


def run_plan(args: argparse.Namespace) -> int:
    model = create_model(args.arch, args.num_classes)
    result = plan(
        model,
        args.block,
        rule_names(args.after),
        include=args.include,
        exclude=args.exclude,
        position=args.position,
        example_input=example_input(model, args.img_size, args.input_size),
        stack=args.stack,
        **block_options(args.option),
    )
    if args.json:
        console.emit_json({"arch": args.arch, **result.summary()})
    else:
        console.out.print(console.plan_table(result))
        for note in result.notes():
            console.err.print(f"[yellow]note:[/] {note}")
    return 0


def run_patch(args: argparse.Namespace) -> int:
    report = _patch_yolo(args) if is_yolo_checkpoint(args.checkpoint) else _patch(args)
    if args.json:
        console.emit_json(report.summary())
    else:
        console.out.print(console.patch_summary(report.summary()))
    return 0


def _patch_yolo(args: argparse.Namespace) -> PatchReport:
    if args.arch is not None or args.num_classes is not None:
        raise AttnInjectError(
            "an ultralytics checkpoint names its own architecture and classes",
            where=args.checkpoint,
            hint="Drop --arch and --num-classes.",
        )
    return patch_yolo_checkpoint(args.checkpoint, args.block, rule_names(args.after), args.output, **_settings(args))


def _patch(args: argparse.Namespace) -> PatchReport:
    if args.arch is None:
        raise AttnInjectError(
            "attn-inject patch: the following arguments are required: --arch",
            hint="Name the checkpoint's architecture (a timm model name, torchvision:NAME, ...); only an "
            "ultralytics .pt names its own. See 'attn-inject patch --help'.",
        )
    chosen = {**_settings(args), "num_classes": args.num_classes}
    return patch_checkpoint(args.checkpoint, args.arch, args.block, rule_names(args.after), args.output, **chosen)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The patch settings the command line gives, as ``patch_checkpoint`` keywords (the two sizes kept
    apart, so a message names the flag that was given)."""
    check_one_size(args.img_size, args.input_size)
    return dict(
        include=args.include,
        exclude=args.exclude,
        position=args.position,
        img_size=args.img_size,
        input_size=args.input_size,
        options=block_options(args.option),
        force=args.force,
        adapter_only=args.adapter_only,
        verify=args.verify,
        stack=args.stack,
    )
