"""The wheel carries the built-in rules (built from this checkout, offline)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_rules(tmp_path):
    source = tmp_path / "src"  # build from a copy so the checkout stays clean
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("attn_inject-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    rules = sorted(Path(n).name for n in names if n.startswith("attn_inject/builtin_rules/") and n.endswith(".yaml"))
    assert rules == sorted(p.name for p in (ROOT / "rules").glob("*.yaml"))
    assert "attn_inject/cli.py" in names and "attn_inject/blocks/eca.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "attn-inject = attn_inject.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
