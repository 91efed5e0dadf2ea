"""The attn-inject command line run in-process, as a user would call it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from attn_inject.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    """``main(argv)`` with every argument as a string (paths welcome): exit code, stdout, stderr."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli_one_line(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    """``run_cli`` with stderr as one line (``one_line``), for messages pinned whole."""
    code, out, err = run_cli(capsys, *argv)
    return code, out, one_line(err)


def last_json(out: str) -> dict:
    """The JSON object on the last line of stdout (the ``--json`` contract)."""
    return json.loads(out.strip().splitlines()[-1])


def one_line(text: str) -> str:
    """Every run of whitespace folded to one space: rich wraps long messages at the console width."""
    return " ".join(text.split())
