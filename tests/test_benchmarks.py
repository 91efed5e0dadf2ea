"""The benchmark scripts run in --quick mode and write sane JSON (about 15 s; one thread, so other load on
the machine cannot make OpenMP thrash)."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_script(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--threads", "1", "--json", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| model |" in proc.stdout  # the markdown table
    return json.loads(out.read_text())


def test_overhead_quick(tmp_path):
    result = run_script("overhead", tmp_path, "--pairs", "se")
    assert result["config"]["batches"] == [1] and result["config"]["threads"] == 1
    (check,) = result["checks"]
    assert check["injected_params_added"] == check["hand_params_added"] == check["plan_params_added"] == 2_530_992
    assert check["same_param_count"] and check["same_param_shapes"]
    models = result["models"]
    assert set(models) == {"resnet50", "resnet50+se", "seresnet50"}
    assert models["resnet50+se"]["flops_added"] == models["seresnet50"]["flops_added"] == check["plan_flops_added"] > 0
    assert models["resnet50+se"]["gated_elements"] > 0
    rows = {r["model"]: r for r in result["latency"]["1"]}
    assert set(rows) == set(models)
    for row in rows.values():
        assert len(row["times_ms"]) == result["config"]["reps"]
        assert 0 < row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
        assert row["vs_base"] > 0 and row["peak_tensor_bytes"] > 0
    assert rows["resnet50+se"]["vs_hand_written"] > 0 and rows["seresnet50"]["vs_hand_written"] is None


def test_patch_time_quick(tmp_path):
    result = run_script("patch_time", tmp_path)
    (row,) = result["rows"]
    assert row["model"] == "resnet18" and row["sites"] == 8 and row["input"] == [1, 3, 224, 224]
    assert set(row["baseline_parts_s"]) == {"torch_load", "save_file", "forward"} and row["baseline_s"] > 0
    assert set(row["patch_phases_s"]) == {"read", "build", "reference_forward", "inject", "write", "verify", "other"}
    assert abs(sum(row["patch_phases_s"].values()) - row["patch_s"]) < 1e-6  # the phases add up to the whole
    assert row["ratio"] == row["patch_s"] / row["baseline_s"] and row["patch_full_s"] > row["patch_full_reload_s"] > 0


def test_inject_time_quick(tmp_path):
    result = run_script("inject_time", tmp_path)
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"resnet18", "resnet34"}
    assert rows["resnet18"]["sites"] == 8 and rows["resnet34"]["sites"] == 16
    assert rows["resnet18"]["params"] < rows["resnet34"]["params"]
    for row in rows.values():
        assert row["rule"] == "residual" and len(row["runs_s"]) == result["config"]["runs"]
        assert row["median_s"] > 0 and row["forward_s"] > 0
        phases = row["phases_s"]
        assert all(phases[p] >= 0 for p in ("reference_forward", "tracing", "interpreter", "verify_forward"))
        assert abs(sum(phases.values()) - row["median_s"]) < 0.5 * row["median_s"]  # medians of parts ~ the whole
