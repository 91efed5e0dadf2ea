"""`attn-inject finetune / eval / inspect / patch` as a daily tool: the plain baseline round trip, files
that remember their input size and classes, per-class results, one-line argument errors, sync-BN
under torchrun."""

import json
import os
import re

import pytest
import timm
import torch
from safetensors.torch import load_file

from attn_inject import load, save
from attn_inject.cli.console import flag_words
from attn_inject.surgery.recipe import recipe_of
from tests.helpers.cli import last_json, one_line, run_cli
from tests.helpers.finetune_data import tiny_model, write_image_folder, write_plain_checkpoint
from tests.helpers.running import run_python

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "resnet10t"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("daily")
    write_plain_checkpoint(root, ARCH)
    return {"root": root, "plain": root / "plain.pth", "data": write_image_folder(root / "data", size=32)}


def test_the_plain_baseline_round_trip(capsys, files, tmp_path):
    """finetune a plain checkpoint (no attention) -> a file with its arch, input size and classes -> load ->
    eval without --arch or --img-size gives the fine-tuned accuracy."""
    base = tmp_path / "base.safetensors"
    argv = ["finetune", files["plain"], "--arch", ARCH, "--num-classes", "3", "--data", files["data"], "-o", base]
    code, out, train_err = run_cli(
        capsys, *argv, "--epochs", "1", "--batch-size", "8", "--img-size", "32", "--log-interval", "1", "--json"
    )
    assert code == 0, train_err
    summary = last_json(out)
    model = load(base)  # no arch: the file names it
    assert recipe_of(model).arch == ARCH and recipe_of(model).injections == () and recipe_of(model).num_classes == 3
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["label_names"] == (
        "ant",
        "bee",
        "cat",
    )
    weights = load_file(base)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    code, out, err = run_cli(capsys, "eval", base, "--data", files["data"], "--batch-size", "8", "--json")
    assert code == 0, err
    report = last_json(out)
    assert report["input_size"] == [3, 32, 32]  # the size it was fine-tuned at, not resnet10t's 176
    assert (report["top1"], report["loss"]) == (summary["after"]["top1"], summary["after"]["loss"])
    matrix = report["confusion"]["matrix"]
    assert report["confusion"]["classes"] == ["ant", "bee", "cat"] and sum(map(sum, matrix)) == 12
    assert report["per_class"] == {
        c: row[i] / sum(row) for i, (c, row) in enumerate(zip(["ant", "bee", "cat"], matrix))
    }
    assert sum(matrix[i][i] for i in range(3)) / 12 == report["top1"]
    code, out, _ = run_cli(capsys, "eval", base, "--data", files["data"], "--img-size", "48", "--json")
    assert code == 0 and last_json(out)["input_size"] == [3, 48, 48]  # --img-size still overrides

    dogs = write_image_folder(tmp_path / "dogs", classes=("ant", "bee", "dog"), train=1, val=1, size=32)
    code, _, err = run_cli(capsys, "eval", base, "--data", dogs)
    assert (
        code == 1
        and "the model was trained on other classes: its output 2 is 'cat', the data's class 2 is 'dog'"
        in (one_line(err))
    )

    plot = tmp_path / "confusion.png"
    code, out, err = run_cli(capsys, "eval", base, "--data", files["data"], "--plot", plot)
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"confusion matrix: {plot}" in out
    code, _, err = run_cli(capsys, "eval", base, "--data", files["data"], "--plot", plot)
    assert code == 1 and "confusion.png: the output file exists. Pass --force" in one_line(err)

    code, out, _ = run_cli(capsys, "inspect", base, "--json")
    info = last_json(out)
    assert (info["content"], info["arch"], info["classes"]) == ("plain", ARCH, ["ant", "bee", "cat"])
    assert info["data_config"]["input_size"] == [3, 32, 32]
    code, out, _ = run_cli(capsys, "inspect", base)
    assert "input 3×32×32" in out and "3: ant, bee, cat" in out

    rows = [json.loads(line) for line in (tmp_path / "base.metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["step", "step", "step", "epoch"]
    assert [{k: v for k, v in r.items() if k != "kind"} for r in rows if r["kind"] == "epoch"] == summary["epochs"]
    printed = re.search(r"epoch 1: train loss ([\d.]+) · val top1 ([\d.]+)% · top5 [\d.]+% · loss ([\d.]+)", train_err)
    epoch = summary["epochs"][0]
    assert printed.groups() == (f"{epoch['train_loss']:.4f}", f"{100 * epoch['top1']:.2f}", f"{epoch['loss']:.4f}")
    assert len(re.findall(r"epoch 1/1 step \d: train loss", train_err)) == 3  # --log-interval 1 without a terminal


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["finetune", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["finetune", "--min-lr", "1e-3"], r"--min-lr must be at most the peak learning rate \(0.0001\), got 0.001"),
        (["finetune", "--seed", "-1"], r"--seed must be an integer in \[0, 4294967295\], got -1"),
        (["finetune", "--workers", "-1"], "--workers must be an integer >= 0, got -1"),
        (["finetune", "--device", "bogus"], r"--device bogus is unknown\. Use cpu, cuda or cuda:N\."),
        (["finetune", "--device", "cuda:3"], r"--device cuda:3: this machine has 0 CUDA devices\. Use cpu\."),
        (["finetune", "--img-size", "100000"], r"--img-size must be an integer in \[1, 4096\], got 100000"),
        (["finetune", "--precision", "fp16"], r"--precision fp16 needs a GPU .*\. On the CPU use --precision bf16\."),
        (["finetune", "--override", "lr"], r"override only applies to a resumed run\. Pass --resume too\."),
        (
            ["finetune", "--tensorboard", "tb"],
            r"--tensorboard tb needs the TensorBoard package, which is not installed\. pip install TensorBoard",
        ),
        (["eval", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["eval", "--workers", "-1"], "--workers must be an integer >= 0, got -1"),
        (["eval", "--device", "bogus"], r"--device bogus is unknown"),
        (["eval", "--img-size", "100000"], r"--img-size must be an integer in \[1, 4096\], got 100000"),
        (
            ["eval", "--num-classes", "5"],
            r"plain\.pth: the checkpoint does not fit ResNet: fc\.weight has shape \[3, 512\] where fc\.weight "
            r"needs \[5, 512\]",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_arguments_are_one_line_naming_the_flag(capsys, files, tmp_path, argv, message):
    command, *flags = argv
    out_args = ["-o", tmp_path / "o.safetensors", "--epochs", "1"] if command == "finetune" else []
    code, out, err = run_cli(
        capsys,
        command,
        files["plain"],
        "--arch",
        ARCH,
        "--num-classes",
        "3",
        "--data",
        files["data"],
        *out_args,
        *flags,
    )
    assert code == 1 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert sorted(os.listdir(tmp_path)) == []


def test_a_diverging_run_exits_1_and_writes_nothing(capsys, files, tmp_path):
    argv = ["finetune", files["plain"], "--arch", ARCH, "--num-classes", "3", "--data", files["data"]]
    code, out, err = run_cli(
        capsys, *argv, "-o", tmp_path / "o.safetensors", "--epochs", "1", "--lr", "1e30", "--batch-size", "8", "--json"
    )
    assert code == 1 and json.loads(out)["error"].startswith("the training loss is nan at step 1 (epoch 1)")
    hint = "Lower --lr (and the attention learning rate), or clip the gradient norm."
    assert one_line(err).endswith(f"training diverged; nothing was written. {hint}")
    assert os.listdir(tmp_path) == []


def test_patch_verify_none_for_a_placement_that_is_not_the_identity(capsys, files, tmp_path):
    argv = ["patch", files["plain"], "--arch", ARCH, "--num-classes", "3", "--block", "se", "--after", "basic"]
    out_file = tmp_path / "paper.safetensors"
    code, _, err = run_cli(capsys, *argv, "--option", "init=paper", "-o", out_file)
    assert code == 1 and one_line(err) == (
        "error: --verify init=paper is not the identity by design: the patched model's outputs differ from the "
        "original's, which --verify fast checks. Pass --verify none to write it (the file is still read back, tensor "
        "by tensor)."
    ).replace("error: --verify init", "error: init")
    assert not out_file.exists()
    code, out, err = run_cli(capsys, *argv, "--option", "init=paper", "-o", out_file, "--verify", "none", "--json")
    assert code == 0, err
    assert last_json(out)["verified"] == "none"
    paper, plain = load(out_file), timm.create_model(ARCH, num_classes=3)
    plain.load_state_dict(torch.load(files["plain"], weights_only=True))
    x = torch.randn(1, 3, 32, 32)
    assert not torch.equal(paper(x), plain.eval()(x))  # sigmoid gates at insertion: not the original's outputs


def test_lines_are_not_folded_without_a_terminal(capsys, tmp_path):
    folder = tmp_path / ("a-long-folder-name-" * 6)
    folder.mkdir()
    code, out, _ = run_cli(capsys, "rules")
    long_file = save(tiny_model(), folder / "tiny-model-with-a-long-name.safetensors")
    code, out, err = run_cli(
        capsys, "eject", long_file, "-o", folder / "out.safetensors", "--arch", "tests.helpers.finetune_data:tiny_gn"
    )
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 and str(folder / "out.safetensors") in out  # not folded at 80 columns


def test_override_is_spelled_as_the_flag():
    message = "lr=0.05 differs from the run's 0.01. Resume with the same lr, or pass override=['lr'] to change it."
    assert flag_words(message, "lr") == (
        "--lr 0.05 differs from the run's 0.01. Resume with the same --lr, or pass --override lr to change it."
    )
    assert flag_words("pass override=['batch_size']", "batch_size") == "pass --override batch-size"


SYNC_TRAIN = ["--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--attention-lr", "3e-2", "--img-size", "16"]
SYNC_TRAIN += ["--attention-only-steps", "2", "--warmup-steps", "2", "--clip-grad", "1", "--json"]


def torchrun_vs_one(tmp_path, data, *flags) -> tuple[dict, dict, dict, dict]:
    """The same finetune command in 1 process (batch 8) and under torchrun in 2 (batch 4 each), on a BatchNorm net."""
    tiny = save(tiny_model("bn"), tmp_path / "tiny.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    results = []
    for name, launcher in {
        "one": [],
        "two": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    }.items():
        out_file = tmp_path / f"{name}.safetensors"
        command = ["-m", "attn_inject", "finetune", str(tiny), "--arch", "tests.helpers.finetune_data:tiny_bn"]
        proc = run_python(
            *launcher,
            *command,
            "--data",
            str(data),
            "--output",
            str(out_file),
            *SYNC_TRAIN,
            *flags,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1  # rank 0 only
        results += [json.loads(lines[0]), load_file(out_file)]
    return tuple(results)


def test_sync_bn_makes_two_processes_equal_one_on_a_batchnorm_model(files, tmp_path):
    """torchrun over gloo, 2 x 4 images against 1 x 8: with --sync-bn each BatchNorm normalises over all 8
    images, so the losses, the accuracy and every weight and running statistic match one process."""
    data = write_image_folder(tmp_path / "data")
    one, w1, two, w2 = torchrun_vs_one(tmp_path, data, "--sync-bn")
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["steps_per_epoch"] == two["steps_per_epoch"] == 3
    for a, b in zip([one["before"], *one["epochs"]], [two["before"], *two["epochs"]]):
        assert a["images"] == b["images"] == 12 and (a["top1"], a["top5"]) == (b["top1"], b["top5"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for a, b in zip(one["epochs"], two["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert set(w1) == set(w2) and not torch.equal(w1["blocks.0.eca.conv.weight"], torch.zeros(1, 1, 3))
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_without_sync_bn_two_processes_differ_from_one_on_a_batchnorm_model(files, tmp_path):
    """The README's statement: without --sync-bn, each process normalises its own 4 images."""
    data = write_image_folder(tmp_path / "data")
    one, w1, two, w2 = torchrun_vs_one(tmp_path, data)
    assert one["epochs"][0]["train_loss"] != pytest.approx(two["epochs"][0]["train_loss"], rel=1e-4)
    assert (w1["blocks.0.n1.running_mean"] - w2["blocks.0.n1.running_mean"]).abs().max() > 1e-3


def test_drop_path_and_channels_last(files, tmp_path):
    """--drop-path builds the model with timm's drop_path_rate (training only: the file loads without it);
    --channels-last trains in that memory format; a model that takes no drop_path_rate is refused by name."""
    from timm.layers import DropPath

    from attn_inject import AttnInjectError
    from attn_inject.finetune.commands import open_model, run_finetune
    from attn_inject.finetune.loop import TrainConfig

    built = open_model(files["plain"], ARCH, 3, model_options={"drop_path_rate": 0.2})
    assert sum(isinstance(m, DropPath) for m in built.modules()) == 3  # timm's linear rates: 0 in the first block
    config = TrainConfig(epochs=1, batch_size=8, img_size=32, drop_path=0.2, channels_last=True, log_interval=0)
    summary = run_finetune(files["plain"], files["data"], tmp_path / "dp.safetensors", config, arch=ARCH, num_classes=3)
    assert summary["config"]["drop_path"] == 0.2 and summary["config"]["channels_last"] is True
    assert not any(isinstance(m, DropPath) for m in load(tmp_path / "dp.safetensors").modules())
    with pytest.raises(AttnInjectError, match=r"torchvision:resnet18 does not take drop_path_rate \("):
        open_model(files["plain"], "torchvision:resnet18", 3, model_options={"drop_path_rate": 0.2})


@pytest.mark.slow
def test_compile_trains_the_same_as_eager(capsys, files, tmp_path):
    argv = ["finetune", files["plain"], "--arch", ARCH, "--num-classes", "3", "--data", files["data"]]
    argv += ["--epochs", "1", "--batch-size", "8", "--img-size", "32", "--json"]
    code, out, err = run_cli(capsys, *argv, "-o", tmp_path / "eager.safetensors")
    assert code == 0, err
    code, out_compiled, err = run_cli(capsys, *argv, "-o", tmp_path / "compiled.safetensors", "--compile")
    assert code == 0, err
    eager, compiled = last_json(out), last_json(out_compiled)
    assert eager["epochs"][0]["train_loss"] == pytest.approx(compiled["epochs"][0]["train_loss"], rel=1e-4)
    a, b = load_file(tmp_path / "eager.safetensors"), load_file(tmp_path / "compiled.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3)  # inductor's kernels round otherwise


def test_the_readme_table_lists_every_finetune_flag_with_its_timm_name():
    import argparse

    from attn_inject.cli.main import build_parser
    from tests.helpers.running import REPO

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {
        option
        for action in commands.choices["finetune"]._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| flag | what | timm `train.py` |") :].split("\n\n")[0]
    rows = [line.split(" | ")[0] for line in table.splitlines()[2:]]
    listed = {flag for row in rows for flag in re.findall(r"--[a-z][\w-]*", row)}
    assert flags == listed
    assert all(len(line.split(" | ")) == 3 and line.split(" | ")[2].strip(" |") for line in table.splitlines()[2:])
