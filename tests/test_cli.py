"""The attn-inject command line, run in-process (main(argv)) and once as a real subprocess."""

import pytest

from tests.helpers.cli import last_json, one_line, run_cli
from tests.helpers.rules import BUILTIN_RULES
from tests.helpers.running import run_python


def test_rules_lists_builtins(capsys):
    code, out, _ = run_cli(capsys, "rules")
    assert code == 0
    for name in ("bottleneck", "basic", "inverted_residual", "residual", "conv"):
        assert name in out
    code, out, _ = run_cli(capsys, "rules", "--json")
    assert [r["name"] for r in last_json(out)["rules"]] == BUILTIN_RULES


def test_plan_table(capsys):
    code, out, err = run_cli(capsys, "plan", "--arch", "resnet50", "--block", "eca", "--after", "bottleneck")
    assert code == 0, err
    assert "layer4.2" in out and "16 sites" in out
    assert "parameters 25,557,032 -> 25,557,118 (+86, +0.000%)" in out


def test_plan_json(capsys):
    code, out, _ = run_cli(
        capsys,
        "plan",
        "--arch",
        "torchvision:resnet18",
        "--block",
        "se",
        "--after",
        "basic",
        "--option",
        "reduction=8",
        "--img-size",
        "96",
        "--json",
    )
    summary = last_json(out)
    assert code == 0 and summary["arch"] == "torchvision:resnet18" and summary["options"] == {"reduction": 8}
    assert len(summary["sites"]) == 8 and summary["sites"][0] == {
        "path": "layer1.0",
        "rule": "basic",
        "position": "branch_end",
        "where": "branch end (before the add)",
        "channels": 64,
        "map": "64x24x24 NCHW",
        "params": 2 * 64 * 8 + 8 + 64,
        "flops": 2 * (2 * 64 * 8),
        "module": "layer1.0.se",
        "options": {"block_in_channels": 64, "reduction": 8},
    }
    assert summary["flops_added"] == sum(s["flops"] for s in summary["sites"])
    assert summary["params_after"] - summary["params_before"] == summary["params_added"]


def test_plan_with_rule_file_include_and_position(capsys, tmp_path):
    rule = tmp_path / "late.yaml"
    rule.write_text("name: late\nmatch: {kind: residual}\ninsert: block_output\ninclude: ['layer4.*']\n")
    code, out, _ = run_cli(
        capsys, "plan", "--arch", "resnet18", "--block", "eca", "--after", str(rule), "--img-size", "64", "--json"
    )
    summary = last_json(out)
    assert code == 0 and [s["module"] for s in summary["sites"]] == ["layer4.0.eca_out", "layer4.1.eca_out"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["plan", "--arch", "resnet5", "--block", "eca", "--after", "bottleneck"],
            "error: unknown timm model 'resnet5'. Did you mean",
        ),
        (
            ["plan", "--arch", "torchvision:resnet", "--block", "eca", "--after", "bottleneck"],
            "error: unknown torchvision model 'resnet'",
        ),
        (
            ["plan", "--arch", "nopackage.mod:make", "--block", "eca", "--after", "bottleneck"],
            "error: cannot import 'nopackage.mod:make'",
        ),
        (
            ["plan", "--arch", "resnet18", "--block", "bam", "--after", "basic"],
            "error: unknown block 'bam'. Valid blocks: cbam, coord, eca, gc, gct, ge, se, simam.",
        ),
        (
            ["plan", "--arch", "resnet18", "--block", "eca", "--after", "bottleneck", "--img-size", "64"],
            "error: rule 'bottleneck' matched nothing in ResNet; the model contains: basic x8, conv x20, residual x8",
        ),
        (
            ["plan", "--arch", "resnet18", "--block", "se", "--after", "basic", "--option", "reduction"],
            "error: --option 'reduction' is not KEY=VALUE",
        ),
    ],
)
def test_errors_are_one_line_exit_1_no_traceback(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 1
    assert message in one_line(err)
    assert "Traceback" not in err and out == ""


def test_console_script_runs_and_reports_errors_cleanly():
    ok = run_python("-m", "attn_inject.cli", "rules")
    assert ok.returncode == 0 and "inverted_residual" in ok.stdout
    bad = run_python("-m", "attn_inject.cli", "plan", "--arch", "resnet18", "--block", "se", "--after", "nope.yaml")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "nope.yaml: cannot read rule file" in bad.stderr


def test_demo_patches_the_real_efficientnet_lite0_file_and_loads_it_back(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "demo", "--json", "--output", str(tmp_path / "lite0-eca.safetensors"))
    report = last_json(out)
    assert code == 0 and report["identical"] is True and report["max_abs_logit_diff"] == 0.0
    assert report["sites"] == 9 and report["params_added"] == 33 and report["keys_mapped_by_order"]
    assert (
        report["checkpoint"].endswith("efficientnet-lite0-57934424.pth")
        and (tmp_path / "lite0-eca.safetensors").is_file()
    )
    labels = {row["photo"]: row["label_after"] for row in report["predictions"]}
    assert list(labels) == ["chelsea", "coffee", "rocket", "astronaut", "horse"]
    assert labels["chelsea"].startswith("tabby") and labels["coffee"] == "espresso" and labels["rocket"] == "missile"
    assert all(
        row["label_before"] == row["label_after"] and row["prob_before"] == row["prob_after"]
        for row in report["predictions"]
    )
