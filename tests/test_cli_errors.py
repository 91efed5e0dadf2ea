"""CLI failures: exit 1, one line on stderr, a JSON error object with --json; strict JSON output."""

import json
import math

import pytest

from attn_inject.cli import console, main
from tests.helpers.cli import last_json, one_line, run_cli

PLAN = ["plan", "--arch", "torchvision:resnet18", "--block", "se", "--after", "basic"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bogus"], r"attn-inject: argument COMMAND: invalid choice: 'bogus'"),
        (
            ["plan", "--arch", "resnet18"],
            r"attn-inject plan: the following arguments are required: --block, --after\. "
            r"See 'attn-inject plan --help'\.",
        ),
        ([*PLAN, "--img-size", "abc"], r"attn-inject plan: argument --img-size: invalid int value: 'abc'"),
        (
            [*PLAN, "--img-size", "-5"],
            r"input size \(3, -5, -5\) is not a \(channels, height, width\) of positive ints up to 4096",
        ),
        ([*PLAN, "--img-size", "200000"], r"input size \(3, 200000, 200000\) is not a"),
        ([*PLAN, "--option", "reduction=abc"], r"block 'se': option reduction='abc' must be float, not str"),
        ([*PLAN, "--option", "reduction=.nan"], r"block 'se': option reduction=nan must be a finite number"),
        ([*PLAN, "--option", "reduction=&a [*a]"], r"--option reduction=&a \[\*a\]:1: anchors and aliases"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_every_error_is_one_line_and_exit_1(capsys, argv, message, as_json):
    code, out, err = run_cli(capsys, *argv, *(["--json"] if as_json else []))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert __import__("re").search(message, lines[0])
    if as_json:
        assert last_json(out) == {"error": lines[0][len("error: ") :]}
    else:
        assert out == ""


def test_json_output_is_strict(capsys):
    console.emit_json({"loss": math.nan, "top1": 0.5, "nested": [math.inf, {"x": -math.inf}]})
    line = capsys.readouterr().out.strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {
        "loss": None,
        "top1": 0.5,
        "nested": [None, {"x": None}],
    }


def test_arch_help_says_a_factory_runs_code(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    assert "it runs that code" in one_line(capsys.readouterr().out)
