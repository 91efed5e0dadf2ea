"""The wheel carries the built-in rules (built from this checkout, offline)."""

import shutil
import zipfile
from pathlib import Path

from tests.helpers.running import REPO, run_python


def test_wheel_ships_the_rules(tmp_path):
    source = tmp_path / "src"  # build from a copy so the checkout stays clean
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    run_python(
        "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)
    ).check_returncode()
    (wheel,) = tmp_path.glob("attn_inject-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    rules = sorted(Path(n).name for n in names if n.startswith("attn_inject/builtin_rules/") and n.endswith(".yaml"))
    assert rules == sorted(p.name for p in (REPO / "rules").glob("*.yaml"))
    assert "attn_inject/cli/main.py" in names and "attn_inject/blocks/eca.py" in names
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "attn_inject").rglob("*.py")}
    assert modules <= set(names) and "attn_inject/py.typed" in names  # every subpackage ships
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "attn-inject = attn_inject.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
