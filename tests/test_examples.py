"""The examples stay true to the code."""

import runpy

import timm

from attn_inject import plan
from attn_inject.rules import resolve_rules
from tests.helpers.running import REPO

EXAMPLES = REPO / "examples"


def test_quickstart_runs(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "bitwise identical: True" in out and out.count("bottleneck at branch end (before the add)") == 16


def test_example_rules_load_and_match():
    assert [r.name for r in resolve_rules(sorted(map(str, (EXAMPLES / "rules").glob("*.yaml"))))] == [
        "late_stages",
        "mobile_block_output",
    ]
    late = plan(timm.create_model("resnet50"), "se", after=str(EXAMPLES / "rules" / "late_stages.yaml"))
    assert [s.path for s in late] == [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)]
    mobilenet, rule = timm.create_model("mobilenetv3_large_100"), str(EXAMPLES / "rules" / "mobilenet_blocks.yaml")
    mobile = plan(mobilenet, "eca", after=rule)
    # half of its matched blocks hold their own SqueezeExcite: skipped unless stack=True
    assert len(mobile) == 5 and {s.position for s in mobile} == {"block_output"}
    assert len(mobile.attended) == 5 and all(a.endswith(": SqueezeExcite") for _, a in mobile.attended)
    assert len(plan(mobilenet, "eca", after=rule, stack=True)) == 10


def test_finetune_own_loop_runs(capsys):
    runpy.run_path(str(EXAMPLES / "finetune_own_loop.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[1]
        == "step 0: training attention: trainable params: 12,843 || all params: 3,383,851 || trainable%: 0.3795"
    )
    assert (
        lines[2]
        == "step 10: training all: trainable params: 3,383,851 || all params: 3,383,851 || trainable%: 100.0000"
    )
    before, after = (float(line.rsplit(" ", 1)[1]) for line in (lines[0], lines[3]))
    # It learns: chance is 0.1. The 40-step trajectory is sensitive to rounding (AdamW turns the
    # near-zero gradients of biases before a train-mode BatchNorm into full-size steps): the two exact
    # forms of the gain-2 gate, x * (2 * sigmoid(z)) and x + x * tanh(z / 2), end at 0.51 and 0.30.
    assert after > before + 0.15
