"""``attn-inject inspect | eject``: what a file holds, and the original weights back from a patched file."""

from __future__ import annotations

import argparse
from typing import Any

from ..files.describe import describe_file
from ..files.eject import eject_file
from . import console
from .arguments import EPILOG


def add_parsers(commands: Any) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="show the recipe, sites, parameter counts, versions, data config and class names in a file",
        epilog=EPILOG,
    )
    inspect.add_argument("file", metavar="FILE", help="a .safetensors file (patched, adapter or plain)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    inspect.set_defaults(run=run_inspect)

    eject = commands.add_parser(
        "eject",
        help="write the original model's weights back from a patched file",
        epilog=EPILOG,
        description="Rebuild the patched model from FILE, remove the injected blocks and write the original "
        "weights (the original state_dict keys) as a plain .safetensors.",
    )
    eject.add_argument("file", metavar="FILE", help="a file written by `attn-inject patch` or save()")
    eject.add_argument("--output", "-o", required=True, metavar="OUT", help="the .safetensors file to write")
    eject.add_argument("--arch", help="the arch to build (needed when the recipe names package.module:factory)")
    eject.add_argument("--force", action="store_true", help="replace OUT if it exists")
    eject.add_argument("--json", action="store_true", help="print one JSON object at the end")
    eject.set_defaults(run=run_eject)


def run_inspect(args: argparse.Namespace) -> int:
    info = describe_file(args.file)
    if args.json:
        console.emit_json(info)
    else:
        console.show_file(info)
    return 0


def run_eject(args: argparse.Namespace) -> int:
    info = eject_file(args.file, args.output, arch=args.arch, force=args.force)
    if args.json:
        console.emit_json(info)
    else:
        console.out.print(
            f"[green]wrote[/] {info['output']} ({info['bytes']:,} bytes): {info['tensors']} tensors of the original "
            f"{info['arch'] or 'model'}, {len(info['removed'])} injected blocks removed"
        )
    return 0
