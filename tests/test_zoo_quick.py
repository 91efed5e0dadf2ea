"""benchmarks/zoo.py in its quick mode: three models, each in its own worker process."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_zoo_quick_mode(tmp_path):
    out = tmp_path / "zoo.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "zoo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["spec"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["timm:convnext", "timm:resnet", "torchvision:mobilenet_v2"]
    for row in rows.values():
        assert row["oracle"]["nchw"] > 0
        for block in ("se", "eca"):
            assert row[block]["identical"] is True and row[block]["sites"] > 0 and row[block]["seconds"] > 0
            assert row[block]["not_run"] == 0 and row[block]["moved_changes_output"] is True
    assert rows["torchvision:mobilenet_v2"]["eca"]["sites"] == 10
    assert "patched with bitwise identity by both SE and ECA: 3 (100.0 %)" in done.stdout
