"""``attn-inject blocks``: the registered attention blocks, their papers, options and sizes."""

from __future__ import annotations

import argparse
from typing import Any

from ..blocks import list_blocks
from ..blocks.registry import describe_block
from ..errors import AttnInjectError
from . import console
from .arguments import EPILOG


def add_parser(commands: Any) -> None:
    blocks = commands.add_parser(
        "blocks",
        help="list the attention blocks: paper, options, parameters",
        epilog=EPILOG,
        description="Every registered block (built-in or registered by an imported package): the paper it "
        "follows, its options with their defaults, how it is the identity at insertion (its zeroed last layers, "
        "'init', or the gated wrapper y = x + alpha*(f(x) - x), 'gate') and its parameters at --channels.",
    )
    blocks.add_argument("--channels", type=int, default=256, help="channels to count parameters at (default 256)")
    blocks.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    blocks.set_defaults(run=run_blocks)


def run_blocks(args: argparse.Namespace) -> int:
    if args.channels < 1:
        raise AttnInjectError(f"--channels must be at least 1, not {args.channels}")
    rows = [describe_block(name, args.channels) for name in list_blocks()]
    if args.json:
        console.emit_json({"channels": args.channels, "blocks": rows})
    else:
        console.out.print(console.blocks_table(rows, args.channels))
    return 0
