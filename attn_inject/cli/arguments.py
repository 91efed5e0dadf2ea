"""Arguments shared by the commands: the parser class whose usage errors are AttnInjectErrors, the
model, surgery and checkpoint argument groups, and turning their values into library arguments."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from torch import nn

from ..blocks import list_blocks
from ..errors import AttnInjectError
from ..graph.example import example_args
from ..rules.located_yaml import load_located_yaml

EPILOG = (
    "Errors print one line on stderr and exit 1; set ATTN_INJECT_DEBUG=1 for a traceback. Ctrl-C, SIGTERM and "
    "SIGHUP stop a command without leaving a partial file (exit 128 + the signal number)."
)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is an AttnInjectError (one line, exit 1) like any other.
    Subcommand parsers are built from this class too (add_subparsers uses the parent's class)."""

    def error(self, message: str) -> NoReturn:
        raise AttnInjectError(f"{self.prog}: {message}", hint=f"See '{self.prog} --help'.")


def add_model_arguments(parser: argparse.ArgumentParser, arch_required: bool = True) -> None:
    parser.add_argument(
        "--arch",
        required=arch_required,
        help="a timm model name, torchvision:NAME, ultralytics:NAME.yaml (a YAML bundled with ultralytics), or "
        "package.module:factory (this imports that module and calls the factory: it runs that code, so name "
        "only code you trust)" + ("" if arch_required else "; not needed for an ultralytics .pt, which names it"),
    )
    parser.add_argument("--num-classes", type=int, help="classifier size, where it differs from the default")
    parser.add_argument(
        "--img-size", type=int, help="side of the square example image (default: the model's own, else 224)"
    )
    parser.add_argument(
        "--input-size",
        type=input_size,
        metavar="C,...",
        help="the example input's shape without the batch, for 1-D and 3-D models too: 1,16000 (NCL), "
        "3,8,112,112 (NCDHW video) (instead of --img-size)",
    )


def add_surgery_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block", required=True, help=f"attention block: {', '.join(list_blocks())}")
    parser.add_argument(
        "--after",
        required=True,
        action="append",
        help="built-in rule name or YAML rule file; repeat or separate with commas for several",
    )
    parser.add_argument(
        "--include", action="append", default=[], metavar="GLOB", help="only module paths matching GLOB (repeatable)"
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="skip module paths matching GLOB (repeatable)"
    )
    parser.add_argument(
        "--position",
        help="override the rules' position: branch_end, block_output, unit_output or after_convN "
        "(N = 1, 2, ... or -1 for the last conv)",
    )
    parser.add_argument(
        "--stack",
        action="store_true",
        help="also put a block where the model already holds channel attention (an SE, ECA, ... on the branch "
        "or after the unit; skipped by default) or the same block from an earlier patch",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="block option, e.g. reduction=8 (se), kernel_size=5 (eca), init=paper; repeatable",
    )


def add_checkpoint_arguments(parser: argparse.ArgumentParser, num_classes_help: str) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="a .safetensors file written by patch, save() or finetune, or a plain checkpoint with --arch",
    )
    parser.add_argument(
        "--data", required=True, metavar="DIR", help="ImageFolder: DIR/train/<class>/*, DIR/val/<class>/*"
    )
    parser.add_argument(
        "--arch", help="architecture of a plain checkpoint (timm name, torchvision:NAME, package.module:factory)"
    )
    parser.add_argument("--num-classes", type=int, help=num_classes_help)
    parser.add_argument(
        "--img-size",
        type=int,
        help="image side (default: the size the file was fine-tuned at, else the model's timm data config)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data loader processes per training process, and threads of the image check (default 0)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: this process's GPU if there is one, else cpu)")
    parser.add_argument(
        "--json", action="store_true", help="progress on stderr, one JSON object on the last line of stdout"
    )


def block_options(pairs: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs, each value read as YAML (numbers, strings, lists)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AttnInjectError(f"--option {pair!r} is not KEY=VALUE", hint="For example --option reduction=8.")
        options[key.strip()] = load_located_yaml(value, f"--option {pair}")
    return options


def rule_names(values: list[str]) -> list[str]:
    """``--after`` values, repeated or comma-separated."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def input_size(value: str) -> tuple[int, ...]:
    """``--input-size C,L`` / ``C,H,W`` / ``C,D,H,W`` as a tuple of ints (checked by example_args)."""
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not comma-separated integers such as 3,8,112,112") from None


def check_one_size(img_size: int | None, size: tuple[int, ...] | None) -> None:
    """``--img-size`` and ``--input-size`` say the same thing: at most one of them."""
    if img_size is not None and size is not None:
        raise AttnInjectError(
            "give --img-size or --input-size, not both", hint="--input-size 3,224,224 is --img-size 224."
        )


def example_size(img_size: int | None, size: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The example input's size from ``--img-size`` (a square RGB image) or ``--input-size``."""
    check_one_size(img_size, size)
    return (3, img_size, img_size) if img_size is not None else size


def example_input(model: nn.Module, img_size: int | None, size: tuple[int, ...] | None = None) -> tuple | None:
    """The example input for ``--img-size`` or ``--input-size`` (None: the model's own size)."""
    chosen = example_size(img_size, size)
    return None if chosen is None else example_args(model, input_size=chosen)
