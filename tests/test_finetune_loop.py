"""The training loop: learns, evaluates before and after each epoch, survives Ctrl-C, resumes exactly."""

import pytest
import torch
from safetensors.torch import load_file

from attn_inject import AttnInjectError
from attn_inject.finetune import distributed
from attn_inject.finetune.commands import save_model
from attn_inject.finetune.data import SeededSamples, data_config, image_folder, transforms
from attn_inject.finetune.evaluation import batches
from attn_inject.finetune.loop import Progress, TrainConfig, TrainingInterrupted, evaluate, finetune
from attn_inject.finetune.state import read_state, state_path
from tests.helpers.finetune_data import tiny_model, write_image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder"))


CONFIG = dict(epochs=3, batch_size=8, lr=1e-2, attention_lr=3e-2, warmup_steps=2, attention_only_steps=2, clip_grad=1.0)


def run(data, output, model=None, progress=None, resume=False, **overrides):
    config = TrainConfig(**{**CONFIG, **overrides})
    model = model or tiny_model("bn")
    return finetune(model, data, config, output=output, save_model=save_model, progress=progress, resume=resume)


def test_finetune_evaluates_before_and_after_each_epoch_and_learns(data, tmp_path):
    model = tiny_model("bn")
    config = data_config(model)
    val = SeededSamples(image_folder(data, "val"), transforms(config)[1])
    before = evaluate(model, torch.utils.data.DataLoader(val, 5), distributed.Context())
    summary = run(data, tmp_path / "out.safetensors", model=model)
    assert summary["before"] == {"top1": before.top1, "top5": before.top5, "loss": before.loss, "images": 12}
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3] and [e["step"] for e in summary["epochs"]] == [3, 6, 9]
    assert summary["after"]["top1"] > summary["before"]["top1"] and summary["after"]["loss"] < summary["before"]["loss"]
    saved = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.metrics.jsonl", "out.safetensors", "out.train-state.pt"]


class StopAt(Progress):
    """Ctrl-C at a given training step (counted over the whole run)."""

    def __init__(self, step: int):
        self.step, self.training, self.seen = step, False, 0

    def start(self, description, total):
        self.training = description.startswith("epoch")

    def update(self, advance=1, **fields):
        self.seen += advance if self.training else 0
        if self.training and self.seen == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_keeps_the_last_epoch_and_resume_finishes_exactly(data, tmp_path):
    full = run(data, tmp_path / "full.safetensors")
    out = tmp_path / "ft.safetensors"
    with pytest.raises(
        TrainingInterrupted,
        match=r"interrupted during epoch 2; .*ft.safetensors holds epoch 1; continue with resume=True",
    ):
        run(data, out, progress=StopAt(5))  # 3 steps per epoch: step 5 is inside epoch 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ft.metrics.jsonl",
        "ft.safetensors",
        "ft.train-state.pt",
        "full.metrics.jsonl",
        "full.safetensors",
        "full.train-state.pt",
    ]
    state = read_state(state_path(out))  # torch.load(weights_only=True)
    assert state["epochs_done"] == 1 and state["step"] == 3
    assert all(torch.equal(load_file(out)[k], v) for k, v in state["model"].items())
    resumed = run(data, out, resume=True)
    assert resumed["before"] == full["before"] and resumed["epochs"] == [
        {**e, "images_per_s": r["images_per_s"]} for e, r in zip(full["epochs"], resumed["epochs"])
    ]
    final, reference = load_file(out), load_file(tmp_path / "full.safetensors")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_resume_refuses_a_different_run(data, tmp_path):
    with pytest.raises(AttnInjectError, match=r"x.train-state.pt: nothing to resume: no training state"):
        run(data, tmp_path / "x.safetensors", resume=True)
    out = tmp_path / "y.safetensors"
    with pytest.raises(TrainingInterrupted):
        run(data, out, progress=StopAt(4))
    with pytest.raises(AttnInjectError, match=r"epochs=5 differs from the interrupted run's 3"):
        run(data, out, resume=True, epochs=5)


def test_batch_smaller_than_the_data_and_bad_config(data, tmp_path):
    with pytest.raises(AttnInjectError, match=r"train/ has 24 images, fewer than one batch of 32"):
        run(data, tmp_path / "o.safetensors", batch_size=32)
    with pytest.raises(AttnInjectError, match=r"label_smoothing must be in \[0, 1\), got 1.5"):
        run(data, tmp_path / "o.safetensors", label_smoothing=1.5)


def test_an_image_that_fails_to_decode_in_a_loader_worker_is_one_line(tmp_path):
    """The full image check finds it before step 0; an image that breaks after the check (read in a loader
    worker) is the same one line."""
    data = write_image_folder(tmp_path / "d", train=4, val=2)
    broken = data / "train" / "bee" / "0.png"
    broken.write_bytes(broken.read_bytes()[:60])  # the header parses, the pixels are cut off
    message = r"^[^\n]*0.png: cannot decode image \(OSError: [^\n]*\)\. Remove or replace the file\.$"
    with pytest.raises(AttnInjectError, match=message):
        run(data, tmp_path / "o.safetensors", workers=1, batch_size=4, epochs=1)
    assert not (tmp_path / "o.safetensors").exists()
    samples = SeededSamples(image_folder(data, "train"), transforms(data_config(tiny_model("bn")))[0])
    with pytest.raises(AttnInjectError, match=message):
        list(batches(torch.utils.data.DataLoader(samples, 4, num_workers=1)))


def test_attention_only_steps_need_blocks(data, tmp_path):
    from tests.helpers.finetune_data import TinyNet

    with pytest.raises(
        AttnInjectError, match=r"attention_only_steps needs injected attention blocks; TinyNet has none"
    ):
        run(data, tmp_path / "o.safetensors", model=TinyNet())
