"""``resume`` is strict: every setting that changes the result must be the interrupted run's, or be
named in ``override``; a training state of another model is refused by name."""

import pytest

from attn_inject import AttnInjectError
from attn_inject.finetune.commands import save_model
from attn_inject.finetune.loop import TrainConfig, TrainingInterrupted, finetune
from attn_inject.finetune.state import read_state, state_path
from attn_inject.testing import move_off_identity
from tests.helpers.finetune_data import TinyNet, tiny_model, write_image_folder
from tests.test_finetune_loop import StopAt

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(epochs=2, batch_size=8, lr=1e-2, attention_lr=3e-2, warmup_steps=1, log_interval=0)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped in its second epoch: OUT and its state hold epoch 1."""
    root = tmp_path_factory.mktemp("resume")
    data = write_image_folder(root / "data")
    out = root / "ft.safetensors"
    with pytest.raises(TrainingInterrupted):
        finetune(tiny_model(), data, TrainConfig(**CONFIG), output=out, save_model=save_model, progress=StopAt(4))
    return data, out


def resume(data, out, model=None, override=(), num_classes=None, **changes):
    return finetune(
        model or tiny_model(),
        data,
        TrainConfig(**{**CONFIG, **changes}),
        output=out,
        save_model=save_model,
        resume=True,
        override=override,
        num_classes=num_classes,
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"batch_size": 4}, r"batch_size=4 differs from the interrupted run's 8"),
        ({"lr": 5e-2}, r"lr=0\.05 differs from the interrupted run's 0\.01"),
        ({"attention_lr": 1e-2}, r"attention_lr=0\.01 differs from the interrupted run's 0\.03"),
        ({"min_lr": 1e-4}, r"min_lr=0\.0001 differs from the interrupted run's 0\.0"),
        ({"warmup_steps": 0}, r"warmup_steps=0 differs from the interrupted run's 1"),
        ({"epochs": 3}, r"epochs=3 differs from the interrupted run's 2"),
        ({"img_size": 12}, r"img_size=12 differs from the interrupted run's null"),
        ({"seed": 1}, r"seed=1 differs from the interrupted run's 0"),
        (
            {"train_transform": {"hflip": 0.0}},
            r'train_transform=\{"hflip": 0\.0\} differs from the interrupted run\'s \{\}',
        ),
        ({"mixup": 0.2}, r"mixup=0\.2 differs from the interrupted run's 0\.0"),
        ({"precision": "bf16"}, r"precision=bf16 differs from the interrupted run\'s fp32"),
        ({"grad_accum": 2}, r"grad_accum=2 differs from the interrupted run's 1"),
        ({"ema": True}, r"ema=true differs from the interrupted run's false"),
        ({"keep": "best"}, r"keep=best differs from the interrupted run's last"),
    ],
)
def test_each_setting_that_changes_the_result_is_refused(interrupted, changes, message):
    data, out = interrupted
    before = out.read_bytes()
    with pytest.raises(AttnInjectError, match=message + r"\. Resume with the same \w+, or pass override=\['\w+'\]"):
        resume(data, out, **changes)
    assert out.read_bytes() == before


def test_another_model_data_or_head_is_refused(interrupted, tmp_path):
    data, out = interrupted
    moved = tiny_model()
    move_off_identity(moved)
    with pytest.raises(
        AttnInjectError, match=r"the model's starting weights differ from the interrupted run's \(fingerprint"
    ):
        resume(data, out, model=moved)
    more = write_image_folder(tmp_path / "more", train=9)
    with pytest.raises(AttnInjectError, match=r'the data differs from the interrupted run\'s \(\{.*"train_images": 27'):
        resume(more, out)
    with pytest.raises(AttnInjectError, match=r"num_classes=3 differs from the interrupted run's null"):
        resume(data, out, num_classes=3)
    with pytest.raises(AttnInjectError, match=r"override names no setting: learning_rate\. Settings a resumed run can"):
        resume(data, out, override=["learning_rate"])
    wide = TinyNet(width=16)  # another model, with the run's fingerprint check overridden: its state does not fit
    with pytest.raises(
        AttnInjectError,
        match=r"ft\.train-state\.pt: the training state holds another model's weights: stem\.0\.weight has shape "
        r"\[8, 3, 3, 3\] where the model's is \[16, 3, 3, 3\]",
    ):
        resume(data, out, model=wide, override=["model"])


def test_override_changes_a_setting_and_the_run_records_it(interrupted, tmp_path):
    data, out = interrupted
    copy = tmp_path / "ft.safetensors"
    copy.write_bytes(out.read_bytes())
    state_path(copy).write_bytes(state_path(out).read_bytes())
    summary = resume(data, copy, override=["epochs", "lr"], epochs=3, lr=5e-2)
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3] and summary["overridden"] == ["epochs", "lr"]
    assert summary["epochs"][1]["lr"] > 0.01  # the new peak rate drives the schedule from the resumed step on
    settings = read_state(state_path(copy))["settings"]
    assert (settings["epochs"], settings["lr"]) == (3, 5e-2)
    with pytest.raises(AttnInjectError, match=r"the run already finished all 3 epochs; nothing to resume"):
        resume(data, copy, epochs=3, lr=5e-2)
