"""Fine-tuning settings beyond the basics: learning-rate checks and divergence, gradient accumulation,
EMA weights, keeping the best epoch (the starting model included), the metrics file, timm's
augmentation and Mixup, and synchronised BatchNorm's arithmetic."""

import json
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from attn_inject import AttnInjectError, load
from attn_inject.finetune import distributed
from attn_inject.finetune.commands import save_model
from attn_inject.finetune.data import SeededSamples, data_config, image_folder, transforms
from attn_inject.finetune.evaluation import evaluate
from attn_inject.finetune.loop import TrainConfig, TrainingInterrupted, ema_path, finetune
from attn_inject.finetune.metrics_log import metrics_path
from attn_inject.finetune.sync_bn import SyncedBatchNorm2d, sync_batchnorm
from tests.helpers.finetune_data import TinyNet, tiny_model, write_image_folder
from tests.test_finetune_loop import StopAt

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(epochs=2, batch_size=8, lr=1e-2, attention_lr=3e-2, warmup_steps=1, log_interval=0)
TINY = "tests.helpers.finetune_data:tiny_gn"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("options") / "data")


def run(data, output, model=None, progress=None, resume=False, **changes):
    config = TrainConfig(**{**CONFIG, **changes})
    return finetune(
        model or tiny_model(), data, config, output=output, save_model=save_model, progress=progress, resume=resume
    )


def test_learning_rates_are_checked(data, tmp_path):
    for changes, message in [
        ({"lr": float("nan")}, r"lr must be a finite number > 0, got nan"),
        ({"lr": float("inf")}, r"lr must be a finite number > 0, got inf"),
        ({"lr": 0.0}, r"lr must be a finite number > 0, got 0\.0"),
        ({"attention_lr": -1.0}, r"attention_lr must be a finite number > 0, got -1\.0"),
        ({"min_lr": 0.02}, r"min_lr must be at most the peak learning rate \(0\.01\), got 0\.02"),
        ({"seed": -1}, r"seed must be an integer in \[0, 4294967295\], got -1"),
        ({"img_size": 100_000}, r"img_size must be an integer in \[1, 4096\], got 100000"),
        ({"grad_accum": 0}, r"grad_accum must be an integer >= 1, got 0"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \(0, 1\), got 1\.0"),
        ({"precision": "fp8"}, r"precision must be one of fp32, bf16, fp16, got fp8"),
        ({"precision": "fp16"}, r"precision=fp16 needs a GPU \(float16 autocast with a grad scaler\)\. On the CPU"),
        (
            {"mixup": 0.2, "batch_size": 5},
            r"batch_size=5 gives 5 images per process; timm's Mixup/CutMix needs an even",
        ),
    ]:
        with pytest.raises(AttnInjectError, match=message) as caught:
            run(data, tmp_path / "o.safetensors", **changes)
        assert (
            caught.value.field == next(iter(changes)) if "batch" not in message else caught.value.field == "batch_size"
        )
    assert os.listdir(tmp_path) == []


def test_a_non_finite_loss_stops_training_naming_the_step_and_writes_nothing(data, tmp_path):
    with pytest.raises(
        AttnInjectError,
        match=r"^the training loss is nan at step 1 \(epoch 1\): training diverged; nothing was written\. Lower lr ",
    ):
        run(data, tmp_path / "o.safetensors", lr=1e30, warmup_steps=0)
    assert os.listdir(tmp_path) == []
    # a finite loss whose step makes the weights non-finite (the last step of an epoch) is caught before writing
    with pytest.raises(AttnInjectError, match=r"running_var is not finite after step 3 \(epoch 1\): training diverged"):
        run(data, tmp_path / "o.safetensors", model=tiny_model("bn"), lr=1e6, warmup_steps=0)
    assert os.listdir(tmp_path) == []


def test_gradient_accumulation_follows_the_gradient_of_the_whole_batch(data, tmp_path):
    whole = run(data, tmp_path / "whole.safetensors")  # GroupNorm: no per-micro-batch statistics
    accumulated = run(data, tmp_path / "accum.safetensors", batch_size=4, grad_accum=2)
    assert accumulated["steps_per_epoch"] == whole["steps_per_epoch"] == 3
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "accum.safetensors")
    assert not torch.equal(a["blocks.0.eca.conv.weight"], torch.zeros(1, 1, 3))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    three = run(data, tmp_path / "three.safetensors", batch_size=4, grad_accum=4)  # 6 micro-batches: steps of 4 and 2
    assert three["steps_per_epoch"] == 2 and [e["step"] for e in three["epochs"]] == [2, 4]


def test_ema_weights_are_saved_evaluated_loaded_and_resumed(data, tmp_path):
    full = run(data, tmp_path / "full.safetensors", ema=True, ema_decay=0.6)
    ema_file = ema_path(tmp_path / "full.safetensors")
    assert full["ema_output"] == str(ema_file) and ema_file.name == "full.ema.safetensors"
    model_weights, ema_weights = load_file(tmp_path / "full.safetensors"), load_file(ema_file)
    run(data, tmp_path / "plain.safetensors")  # the EMA only watches: the model trains exactly as without it
    assert all(torch.equal(v, model_weights[k]) for k, v in load_file(tmp_path / "plain.safetensors").items())
    assert set(model_weights) == set(ema_weights) and any(
        not torch.equal(model_weights[k], ema_weights[k]) for k in model_weights
    )
    ema = load(ema_file, TINY)  # a file like OUT: load() and eval read it
    val = SeededSamples(image_folder(data, "val"), transforms(data_config(ema))[1])
    metrics = evaluate(ema, torch.utils.data.DataLoader(val, 8), distributed.Context())
    last = full["epochs"][-1]
    assert (
        (metrics.top1, metrics.loss)
        == (last["ema_top1"], last["ema_loss"])
        == (
            full["ema_after"]["top1"],
            full["ema_after"]["loss"],
        )
    )
    out = tmp_path / "ft.safetensors"
    with pytest.raises(TrainingInterrupted):
        run(data, out, ema=True, ema_decay=0.6, progress=StopAt(5))
    run(data, out, ema=True, ema_decay=0.6, resume=True)
    resumed = load_file(ema_path(out))
    assert all(torch.equal(resumed[k], v) for k, v in ema_weights.items())  # the EMA resumes exactly too


def test_keep_best_keeps_the_starting_model_when_no_epoch_beats_it(tmp_path):
    good = write_image_folder(tmp_path / "good")
    model = tiny_model()
    run(good, tmp_path / "trained.safetensors", model=model, epochs=3)
    # train on labels that contradict val/ (each train folder holds another class's colour): val accuracy falls
    swapped = write_image_folder(tmp_path / "swapped", classes=("bee", "cat", "ant"))
    for split_class in ("ant", "bee", "cat"):
        val = swapped / "val" / split_class
        for f in val.iterdir():
            f.unlink()
        for f in (good / "val" / split_class).iterdir():
            (val / f.name).write_bytes(f.read_bytes())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    summary = run(swapped, tmp_path / "best.safetensors", model=model, keep="best", lr=3e-2)
    assert summary["before"]["top1"] == 1.0 and all(e["top1"] < 1.0 for e in summary["epochs"])
    assert summary["kept_epoch"] == 0 and summary["after"] == summary["before"]
    kept = load_file(tmp_path / "best.safetensors")
    assert all(torch.equal(kept[k], v) for k, v in start.items())  # the starting weights, exactly
    assert not torch.equal(model.head.weight, start["head.weight"])  # while the model trained on


def test_the_metrics_file_has_a_row_per_epoch_and_per_log_interval(data, tmp_path):
    out = tmp_path / "m.safetensors"
    summary = run(data, out, log_interval=2, ema=True)
    rows = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["step", "epoch", "step", "step", "epoch"]  # steps 2, 4, 6; epochs end at 3, 6
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [{k: v for k, v in r.items() if k != "kind"} for r in epochs] == summary["epochs"]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [2, 4, 6] and all(r["train_loss"] > 0 for r in rows)
    with pytest.raises(
        AttnInjectError, match=r"tensorboard=.*tb needs the TensorBoard package, which is not installed"
    ):
        run(data, tmp_path / "tb.safetensors", tensorboard=str(tmp_path / "tb"))


def test_tensorboard_gets_the_metrics_rows_when_installed(data, tmp_path, monkeypatch):
    """The tensorboard package is not installed here: torch's SummaryWriter is stood in for by a recorder."""
    scalars = []

    class SummaryWriter:
        def __init__(self, folder):
            scalars.append(("folder", folder, None))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            scalars.append(("closed", None, None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    summary = run(data, tmp_path / "tb.safetensors", tensorboard=str(tmp_path / "tb"), epochs=1)
    record = summary["epochs"][0]
    assert scalars[0] == ("folder", str(tmp_path / "tb"), None) and scalars[-1][0] == "closed"
    assert ("epoch/top1", record["top1"], 3) in scalars and ("epoch/train_loss", record["train_loss"], 3) in scalars


def test_timm_augmentation_and_mixup_train(data, tmp_path):
    summary = run(
        data,
        tmp_path / "aug.safetensors",
        train_transform={"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.25, "hflip": 0.0},
        mixup=0.2,
        cutmix=1.0,
        epochs=1,
    )
    assert summary["epochs"][0]["train_loss"] > 0 and summary["config"]["train_transform"]["re_prob"] == 0.25
    with pytest.raises(AttnInjectError, match=r"timm's create_transform refuses the train augmentation"):
        run(data, tmp_path / "bad.safetensors", train_transform={"no_such_option": 1})


def test_synced_batchnorm_computes_batchnorm_over_all_processes(tmp_path):
    """One process in a gloo group: the synchronised layers' outputs, gradients and running statistics
    are BatchNorm's (the torchrun test checks 2 processes against 1)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        plain = TinyNet(kind="bn").train()
        synced = sync_batchnorm(TinyNet(kind="bn").train(), distributed.Context())
        synced.load_state_dict(plain.state_dict())
        assert type(synced.stem[1]) is SyncedBatchNorm2d and list(synced.state_dict()) == list(plain.state_dict())
        x = torch.randn(6, 3, 16, 16)
        plain(x).square().sum().backward()
        synced(x).square().sum().backward()
        for (name, a), b in zip(plain.named_parameters(), synced.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, a), b in zip(plain.named_buffers(), synced.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        torch.distributed.destroy_process_group()


def test_fp16_steps_go_through_a_grad_scaler():
    """The loop takes fp16 on GPUs only; the step itself is device-agnostic, so its scaler path runs here on
    the CPU: a step with finite scaled gradients updates, one whose scaled gradients overflow is skipped."""
    from attn_inject.finetune.step import Stepper

    model = TinyNet(kind="gn")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stepper = Stepper(
        model, optimizer, TrainConfig(epochs=1, precision="fp16", clip_grad=1.0), distributed.Context(), 3
    )
    stepper.rewrap()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_sum, images = stepper.step([(x, y)], 0)
    assert images == 4 and loss_sum > 0 and stepper.scaler.get_scale() == 65536.0
    assert not torch.equal(model.head.weight, before["head.weight"])
    stepper.scaler = torch.amp.GradScaler("cpu", init_scale=1e38)  # the scaled gradients overflow
    updated = {k: v.clone() for k, v in model.state_dict().items()}
    stepper.step([(x, y)], 1)
    assert all(torch.equal(v, updated[k]) for k, v in model.state_dict().items())  # the step was skipped
    assert stepper.scaler.get_scale() < 1e38
