"""`python -m benchmarks.zoo` in its quick mode: three models, each in its own worker process."""

import json

from tests.helpers.running import run_python


def test_zoo_quick_mode(tmp_path):
    out = tmp_path / "zoo.jsonl"
    done = run_python("-m", "benchmarks.zoo", "--quick", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["spec"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["timm:convnext", "timm:resnet", "torchvision:mobilenet_v2"]
    for row in rows.values():
        assert row["oracle"]["nchw"] > 0
        for block in ("se", "eca"):
            assert row[block]["identical"] is True and row[block]["sites"] > 0 and row[block]["seconds"] > 0
            assert row[block]["not_run"] == 0 and row[block]["moved_changes_output"] is True
            assert row[block]["attended"] == row[block]["folded"] == 0 and row[block]["stacked"] is False
    assert rows["torchvision:mobilenet_v2"]["eca"]["sites"] == 10
    assert "patched with bitwise identity by both SE and ECA: 3 (100.0 %)" in done.stdout
