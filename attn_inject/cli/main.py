"""The ``attn-inject`` entry point: the parser assembled from each command family, one error path."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import AttnInjectError
from . import block_commands, console, demo, file_commands, surgery_commands, training_commands
from .arguments import EPILOG, Parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr and exit status 1 (with ``--json``,
    also a JSON object ``{"error": ...}`` on stdout); ATTN_INJECT_DEBUG=1 shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    console.setup_logging()
    try:
        args = build_parser().parse_args(argv)
        return args.run(args) or 0
    except KeyboardInterrupt:
        return _fail("interrupted", as_json, code=130)
    except Exception as exc:
        if os.environ.get("ATTN_INJECT_DEBUG") == "1":
            raise
        if isinstance(exc, AttnInjectError):
            return _fail(console.flag_words(str(exc), exc.field), as_json)
        # an unexpected failure still ends in one line, not a traceback
        return _fail(f"{type(exc).__name__}: {exc} (set ATTN_INJECT_DEBUG=1 for the traceback)", as_json)


def _fail(message: str, as_json: bool, code: int = 1) -> int:
    message = " ".join(message.split())  # one line, whatever the exception held
    console.error(message)
    if as_json:
        console.emit_json({"error": message})
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="attn-inject",
        description="Splice identity-initialised SE / ECA channel attention into pretrained CNNs.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    surgery_commands.add_parsers(commands)
    file_commands.add_parsers(commands)
    block_commands.add_parser(commands)
    demo.add_parser(commands)
    training_commands.add_parsers(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
