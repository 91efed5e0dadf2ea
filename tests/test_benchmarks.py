"""The benchmark scripts run in --quick mode and write sane JSON (about 15 s; one thread, so other load on
the machine cannot make OpenMP thrash)."""

import json
import statistics
from pathlib import Path

import pytest

from tests.helpers.running import run_python


def run_script(name: str, tmp_path: Path, *args: str, timeout: float = 120) -> dict:
    out = tmp_path / f"{name}.json"
    proc = run_python(
        "-m", f"benchmarks.{name}", "--quick", "--threads", "1", "--json", str(out), *args, timeout=timeout
    )
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


def test_finetune_quick(tmp_path):
    result = run_script("finetune", tmp_path, timeout=400)  # about 45 s of CPU; longer when the machine is busy
    digits = result["digits"]
    base_end = digits["base"]["curve"][-1]
    assert set(digits["runs"]) == {"none", "eca", "se", "se-paper"}
    for name in ("eca", "se", "none"):  # identity init: step 0 is the base, exactly
        (run,) = digits["runs"][name]
        assert {k: run["curve"][0][k] for k in ("top1", "loss")} == {k: base_end[k] for k in ("top1", "loss")}
    rows = {r["model"]: r for r in digits["table"]}
    assert rows["eca"]["step0_equals_base"] and rows["se"]["step0_equals_base"]
    assert not rows["se-paper"]["step0_equals_base"]  # the plain init moves the start
    assert set(result["transfer"]["runs"]) == {"lite0", "lite0+eca"}
    (plain,), (eca,) = result["transfer"]["runs"].values()
    assert plain["curve"][0] == eca["curve"][0]  # the same new head, ECA is the identity at step 0
    rows = {r["model"]: r for r in result["cost"]["rows"]}
    assert set(rows) == {"resnet50", "resnet50+se", "seresnet50"} and rows["resnet50+se"]["vs_hand_written"] > 0
    paired = rows["resnet50+se"]["paired_vs_hand_written"]
    inj, hand = rows["resnet50+se"]["times_ms"], rows["seresnet50"]["times_ms"]
    assert paired["median"] == pytest.approx(statistics.median(a / b for a, b in zip(inj, hand)), rel=1e-12)
    assert paired["ci95"][0] <= paired["median"] <= paired["ci95"][1]
    assert rows["seresnet50"]["paired_vs_hand_written"] is None
    assert rows["resnet50+se"]["peak_tensor_bytes"] <= 1.005 * rows["seresnet50"]["peak_tensor_bytes"]
    assert (tmp_path / "finetune_digits.png").stat().st_size > 10_000


def test_patch_time_quick(tmp_path):
    result = run_script("patch_time", tmp_path)
    (row,) = result["rows"]
    assert row["model"] == "resnet18" and row["sites"] == 8 and row["input"] == [1, 3, 224, 224]
    assert set(row["baseline_parts_s"]) == {"torch_load", "save_file", "forward"} and row["baseline_s"] > 0
    assert set(row["patch_phases_s"]) == {"read", "build", "inject", "write", "verify", "other"}
    assert abs(sum(row["patch_phases_s"].values()) - row["patch_s"]) < 1e-6  # the phases add up to the whole
    assert row["ratio"] == row["patch_s"] / row["baseline_s"] and row["patch_full_s"] > row["patch_full_reload_s"] > 0


def test_reconstruct_quick(tmp_path):
    (row,) = run_script("reconstruct", tmp_path)["rows"]
    assert row["model"] == "timm:regnety_002" and row["sites"] == 13 and row["tensors_mapped"] == 52
    assert row["paper_allclose"] and row["identity_bitwise"] and row["attention_matters_max_abs_diff"] > 0


def test_whole_model_time_quick(tmp_path):
    result = run_script("whole_model_time", tmp_path)
    (row,) = result["rows"]
    assert row["model"] == "fasterrcnn_mobilenet_v3_large_320_fpn" and row["image"] == 320 and row["sites"] == 10
    assert row["stem_passes"] == 3  # the reference forward, the analysis, the verification: no re-runs
    assert row["inject_s"] >= sum(row["steps_s"].values()) > 0 and row["forward_s"] > 0


def test_hostile_load_quick(tmp_path):
    out = tmp_path / "hostile_load.json"
    proc = run_python("-m", "benchmarks.hostile_load", "--quick", "--threads", "1", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| case | file MB | inspect s | load s |" in proc.stdout and "worst hostile load: " in proc.stdout
    rows = json.loads(out.read_text())["models"]["test_resnet"]
    bomb, rules = (
        "example input 1x3x4096x4096 (issue: 28 s, 3 GB)",
        "300 maximal rules (issue: 12 s inspect, 14 s load)",
    )
    assert list(rows) == ["honest", bomb, rules]
    assert rows["honest"]["load"]["outcome"] == rows["honest"]["inspect"]["outcome"] == "works"
    assert rows[bomb]["load"]["outcome"].startswith(
        "refused: injection 0 (eca) records the example input [[1, 3, 4096, 4096]]: 50,331,648 example values"
    )
    for op in ("inspect", "load"):
        assert rows[rules][op]["outcome"].startswith("refused: not a valid .safetensors file (a header of 28,")
    assert all(row[op]["peak_rss"] >= row[op]["rss_before"] > 0 for row in rows.values() for op in ("inspect", "load"))


def test_hostile_checkpoints_quick(tmp_path):
    out = tmp_path / "hostile_checkpoints.json"
    proc = run_python("-m", "benchmarks.hostile_checkpoints", "--quick", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| case | reader | file KB | seconds | peak above start MB | outcome |" in proc.stdout
    rows = json.loads(out.read_text())["cases"]
    honest, bomb, paths = rows
    assert honest == "plain .pth, timm resnet18 (honest)" and rows[honest]["outcome"] == "works"
    assert rows[bomb]["outcome"].startswith("refused: the checkpoint unpacks to 268,435,")
    assert rows[paths]["outcome"].startswith("refused: the pickled model has more than 50,000 tensors")
    assert rows[bomb]["bytes"] < 300_000 and rows[paths]["bytes"] < 12_000
    assert all(row["peak_rss"] >= row["rss_before"] > 0 for row in rows.values())


def test_yolo_quick(tmp_path):
    pytest.importorskip("ultralytics")
    result = run_script("yolo", tmp_path, timeout=300)
    assert list(result["models"]) == ["yolov8n", "+eca residual"] and result["config"]["epochs"] == 1
    plain, patched = result["models"]["yolov8n"], result["models"]["+eca residual"]
    assert (plain["blocks"], patched["blocks"]) == (0, 6)
    assert patched["params"] - plain["params"] == 20  # six ECA convs of k = 3 or 5: the head is the same
    for row in (plain, patched):
        assert len(row["epoch_train_s"]) == len(row["get_model_s"]) == 1
        # the last epoch's validation and the final one of best.pt: ultralytics fires on_fit_epoch_end for both
        assert len(row["epoch_val_s"]) == 2
        assert min(row["val_s"]) > 0 and min(row["median_epoch_train_s"]) > 0
        assert 0 <= row["map50_95"] <= row["map50"] <= 1 and row["last_train_loss"] > 0
    conv, residual = result["inject_cost"]["conv"], result["inject_cost"]["residual"]
    assert conv["with_alternates_patched_forward_fuse"] == 57  # every Conv whose forward got a block
    assert conv["without_patched_forward_fuse"] == residual["with_alternates_patched_forward_fuse"] == 0


def test_image_check_quick(tmp_path):
    out = tmp_path / "image_check.json"
    proc = run_python("-m", "benchmarks.image_check", "--quick", "--threads", "1", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| format | side |" in proc.stdout
    rows = {r["format"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"jpg", "png"}
    for row in rows.values():
        assert row["images"] == 40 and row["side"] == 64
        assert 0 < row["cache_second_run_ms_per_1000"] < row["cache_first_run_ms_per_1000"]
        assert row["decode_1_thread_ms_per_1000"] > 0 and row["decode_2_threads_ms_per_1000"] > 0


def test_nd_zoo_quick(tmp_path):
    result = run_script("nd_zoo", tmp_path)
    (row,) = result["rows"]
    assert (row["model"], row["dims"], row["input"]) == ("hand:resnet1d", 1, [1, 1, 1024])
    for block, added in (
        ("se", 2 * (2 * (32 * 8) + 8 + 32) + 2 * (2 * 64 * 8 + 8 + 64) + 2 * (2 * 128 * 8 + 8 + 128)),
        ("eca", 2 * 3 + 2 * 3 + 2 * 5),  # k = 3, 3, 5 at 32, 64, 128 channels
    ):
        r = row[block]
        assert (r["sites"], r["params_added"], r["maps"]) == (6, added, ["NCL"])
        assert r["bitwise"] and r["not_run"] == 0 and r["moved_changes_output"] and r["inject_forwards"] > 0
    channels = [p["channels"] for p in result["parameters"]]
    assert channels == [64, 128, 256, 512, 1024, 2048] and result["parameters"][2]["monai_r16"] == 8464


def test_gate_cost_quick(tmp_path):
    out = tmp_path / "gate_cost.json"
    proc = run_python("-m", "benchmarks.gate_cost", "--quick", "--threads", "1", "--json", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {r["form"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 5 and rows["timm x * sigmoid(z): forward + backward"]["vs_timm"] == 1.0
    assert all(0 < r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] for r in rows.values())


def test_gate_cost_se_stages_quick(tmp_path):
    out = tmp_path / "se_stages.json"
    args = ("-m", "benchmarks.gate_cost", "--quick", "--se-stages", "--threads", "1", "--json", str(out))
    proc = run_python(*args, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["se_stages"]
    assert [r["shape"] for r in rows] == [[2, 256, 8, 8], [2, 512, 4, 4], [2, 1024, 2, 2], [2, 2048, 1, 1]]
    assert [r["blocks"] for r in rows] == [3, 4, 6, 3] and all(r["timm_ms"] > 0 and r["paired"] > 0 for r in rows)
    assert "| per step (16 blocks) |" in proc.stdout
