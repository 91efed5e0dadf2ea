"""The ``attn-inject`` entry point: the parser assembled from each command family, one error path."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import AttnInjectError
from . import block_commands, console, demo, file_commands, surgery_commands, training_commands
from .arguments import EPILOG, Parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr and exit status 1 (with ``--json``,
    also a JSON object ``{"error": ...}`` on stdout); ATTN_INJECT_DEBUG=1 shows the traceback.

    SIGTERM and SIGHUP (what ``timeout``, Slurm, ``docker stop`` and a closed terminal send) are
    handled like Ctrl-C: the command stops where it is, a file being written is removed, and the exit
    status is 128 + the signal's number (130 for Ctrl-C).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    console.setup_logging()
    received: list[int] = []
    try:
        with _signals_as_interrupts(received):
            args = build_parser().parse_args(argv)
            code = args.run(args) or 0
        return 128 + received[0] if received and code == 130 else code
    except KeyboardInterrupt as exc:  # finetune's says which epoch is kept and how to continue
        name = signal.Signals(received[0]).name if received else "Ctrl-C"
        message = getattr(exc, "message", None) or f"interrupted ({name})"
        code = 128 + (received[0] if received else signal.SIGINT)
        return _fail(console.flag_words(message, getattr(exc, "field", None)), as_json, code=code)
    except Exception as exc:
        if os.environ.get("ATTN_INJECT_DEBUG") == "1":
            raise
        if isinstance(exc, AttnInjectError):
            return _fail(console.flag_words(str(exc), exc.field), as_json)
        # an unexpected failure still ends in one line, not a traceback
        return _fail(f"{type(exc).__name__}: {exc} (set ATTN_INJECT_DEBUG=1 for the traceback)", as_json)


INTERRUPTS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _signals_as_interrupts(received: list[int]) -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, once (a second one gets the default action: the
    process ends; what it was writing is removed by the next run); the previous handlers come back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: object) -> None:
        received.append(signum)
        for other in INTERRUPTS:
            signal.signal(other, signal.SIG_DFL)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in INTERRUPTS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
