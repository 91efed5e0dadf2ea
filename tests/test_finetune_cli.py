"""`attn-inject eval` and `attn-inject finetune` on a small timm ResNet and a synthetic ImageFolder."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from attn_inject import inject, load, save
from attn_inject.cli.console import TrainingProgress
from attn_inject.surgery.recipe import recipe_of
from attn_inject.testing import move_off_identity
from tests.helpers.cli import last_json, run_cli
from tests.helpers.finetune_data import tiny_model, write_image_folder, write_plain_checkpoint
from tests.helpers.running import run_python

ARCH = "resnet10t"
COMMON = ("--img-size", "32")
TRAIN = ("--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--attention-lr", "3e-2", *COMMON)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A plain .pth checkpoint with 3 classes, its ECA-patched file, and a 3-class ImageFolder."""
    root = tmp_path_factory.mktemp("cli")
    model = write_plain_checkpoint(root, ARCH)
    save(inject(model, "eca", after="basic"), root / "eca.safetensors")
    return {
        "plain": root / "plain.pth",
        "eca": root / "eca.safetensors",
        "data": write_image_folder(root / "data", size=32),
    }


def test_eval_of_the_patched_file_equals_the_original_checkpoint(capsys, files, tmp_path):
    code, out, err = run_cli(
        capsys, "eval", files["plain"], "--arch", ARCH, "--num-classes", "3", "--data", files["data"], *COMMON, "--json"
    )
    assert code == 0, err
    plain = last_json(out)
    code, out, err = run_cli(capsys, "eval", files["eca"], "--data", files["data"], *COMMON, "--json")
    assert code == 0, err
    patched = last_json(out)
    assert (patched["top1"], patched["top5"], patched["loss"]) == (plain["top1"], plain["top5"], plain["loss"])
    assert patched["images"] == 12 and 0 <= patched["top1"] <= 1 and patched["input_size"] == [3, 32, 32]
    model = load(files["eca"])
    move_off_identity(model)  # blocks off identity: another loss
    moved = save(model, tmp_path / "moved.safetensors")
    code, out, _ = run_cli(capsys, "eval", moved, "--data", files["data"], *COMMON, "--json")
    assert code == 0 and last_json(out)["loss"] != plain["loss"]
    code, out, _ = run_cli(capsys, "eval", files["eca"], "--data", files["data"], *COMMON)
    assert out.startswith(f"{files['eca']}: top1 ") and "on 12 images" in out


def test_finetune_writes_a_patched_file_that_load_and_eval_read(capsys, files, tmp_path):
    out_file = tmp_path / "ft.safetensors"
    code, out, err = run_cli(
        capsys,
        "finetune",
        files["eca"],
        "--data",
        files["data"],
        "--output",
        out_file,
        *TRAIN,
        "--attention-only-steps",
        "3",
        "--clip-grad",
        "1",
        "--json",
    )
    assert code == 0, err
    summary = last_json(out)
    assert len(out.strip().splitlines()) == 1  # progress and notes went to stderr
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2] and summary["steps_per_epoch"] == 3
    assert "step 3: training all" in err and "step 0: training attention" in err
    code, out, _ = run_cli(
        capsys, "eval", files["eca"], "--data", files["data"], *COMMON, "--batch-size", "8", "--json"
    )
    assert {k: summary["before"][k] for k in ("top1", "loss")} == {k: last_json(out)[k] for k in ("top1", "loss")}
    code, out, _ = run_cli(capsys, "eval", out_file, "--data", files["data"], *COMMON, "--batch-size", "8", "--json")
    assert {k: summary["after"][k] for k in ("top1", "loss")} == {k: last_json(out)[k] for k in ("top1", "loss")}
    model = load(out_file)
    assert len(recipe_of(model).injections) == 1
    assert not torch.equal(model.layer1[0].se.conv.weight, torch.zeros_like(model.layer1[0].se.conv.weight))


def test_finetune_refuses_bad_input_in_one_line(capsys, files, tmp_path):
    data, eca = files["data"], files["eca"]
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    cases = {
        "the output file exists\\. Pass --force": (eca, "--data", data, "--output", existing, *TRAIN),
        "the output is the input file": (eca, "--data", data, "--output", eca, *TRAIN),
        "no such data folder": (eca, "--data", tmp_path / "none", "--output", tmp_path / "o.safetensors", *TRAIN),
        "a plain checkpoint \\(no attn_inject recipe inside\\)\\. Name its architecture with --arch": (
            files["plain"],
            "--data",
            data,
            "--output",
            tmp_path / "o.safetensors",
            *TRAIN,
        ),
        "the output must be a .safetensors file": (eca, "--data", data, "--output", tmp_path / "o.pth", *TRAIN),
    }
    for message, argv in cases.items():
        code, out, err = run_cli(capsys, "finetune", *argv)
        assert code == 1 and out == "", message
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert __import__("re").search(message, err), err
    assert existing.read_bytes() == b"keep me" and not (tmp_path / "o.safetensors").exists()


def test_a_head_of_another_size_is_replaced_only_when_asked(capsys, files, tmp_path):
    five = tmp_path / "five"
    write_image_folder(five, classes=("a", "b", "c", "d", "e"), train=2, val=1, size=32)
    out_file = tmp_path / "five.safetensors"
    argv = ("finetune", files["eca"], "--data", five, "--output", out_file, *TRAIN, "--json")
    code, _, err = run_cli(capsys, *argv)
    assert (
        code == 1
        and "the data has 5 classes but the model's head has 3 outputs. Pass --num-classes 5 to replace" in err
    )
    code, out, err = run_cli(capsys, *argv, "--num-classes", "5", "--attention-only-steps", "1")
    assert code == 0, err
    assert last_json(out)["head_replaced"] is True
    model = load(out_file)
    assert recipe_of(model).num_classes == 5 and model.get_classifier().out_features == 5
    code, _, err = run_cli(capsys, "eval", files["eca"], "--data", five, *COMMON)
    assert code == 1 and "the data has 5 classes but the model's head has 3 outputs" in err


def test_ctrl_c_then_resume(capsys, files, tmp_path, monkeypatch):
    out_file = tmp_path / "ft.safetensors"
    argv = ("finetune", files["eca"], "--data", files["data"], "--output", out_file, *TRAIN, "--json")
    calls = []
    original = TrainingProgress.update

    def interrupt_in_epoch_2(self, advance=1, **fields):
        calls.append(self.description)
        if self.description == "epoch 2/2":
            raise KeyboardInterrupt
        original(self, advance, **fields)

    monkeypatch.setattr(TrainingProgress, "update", interrupt_in_epoch_2)
    code, out, err = run_cli(capsys, *argv)
    message = f"interrupted during epoch 2; {out_file} holds epoch 1; continue with --resume"
    assert code == 130 and last_json(out) == {"error": message} and len(out.splitlines()) == 1  # --json: JSON too
    assert err.strip().endswith(message)
    first = out_file.read_bytes()
    monkeypatch.setattr(TrainingProgress, "update", original)
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and "the output file exists" in err and out_file.read_bytes() == first
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert [e["epoch"] for e in last_json(out)["epochs"]] == [1, 2] and "resuming after epoch 1 of 2" in err


@pytest.mark.slow  # the default run has the torchrun test of test_finetune_cli_files (BatchNorm, --sync-bn)
def test_torchrun_runs_the_same_command_and_matches_one_process(files, tmp_path):
    """`torchrun --nproc-per-node 2 -m attn_inject finetune ...` (DDP over gloo, batch 4 per rank) against the
    same command in one process (batch 8): the same samples per step, the same augmentation per sample
    (seeded by sample), GroupNorm (no per-rank batch statistics); only rank 0 prints and writes."""
    tiny = save(tiny_model("gn"), tmp_path / "tiny.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    results = {}
    for name, launcher in {
        "one": [],
        "two": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    }.items():
        out_file = tmp_path / f"{name}.safetensors"
        cmd = [
            *launcher,
            "-m",
            "attn_inject",
            "finetune",
            str(tiny),
            "--arch",
            "tests.helpers.finetune_data:tiny_gn",  # imported from the repository root
            "--data",
            str(files["data"]),
            "--output",
            str(out_file),
            *map(str, TRAIN),
            "--attention-only-steps",
            "2",
            "--warmup-steps",
            "2",
            "--clip-grad",
            "1",
            "--json",
        ]
        proc = run_python(*cmd, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1  # rank 0 only
        results[name] = (json.loads(lines[0]), load_file(out_file))
    (one, w1), (two, w2) = results["one"], results["two"]
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["steps_per_epoch"] == two["steps_per_epoch"] == 3
    for a, b in zip([one["before"], *one["epochs"]], [two["before"], *two["epochs"]]):
        assert a["images"] == b["images"] == 12 and (a["top1"], a["top5"]) == (b["top1"], b["top5"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert set(w1) == set(w2) and not torch.equal(w1["blocks.0.eca.conv.weight"], torch.zeros(1, 1, 3))
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=1e-5)
