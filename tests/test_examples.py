"""The examples stay true to the code."""

import runpy
from pathlib import Path

import timm

from attn_inject import plan
from attn_inject.rules import resolve_rules

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "bitwise identical: True" in out and out.count("bottleneck at branch end (before the add)") == 16


def test_example_rules_load_and_match():
    assert [r.name for r in resolve_rules(sorted(map(str, (EXAMPLES / "rules").glob("*.yaml"))))] == ["late_stages", "mobile_block_output"]
    late = plan(timm.create_model("resnet50"), "se", after=str(EXAMPLES / "rules" / "late_stages.yaml"))
    assert [s.path for s in late] == [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)]
    mobile = plan(timm.create_model("mobilenetv3_large_100"), "eca", after=str(EXAMPLES / "rules" / "mobilenet_blocks.yaml"))
    assert len(mobile) == 10 and {s.position for s in mobile} == {"block_output"}
