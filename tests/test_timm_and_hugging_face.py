"""timm and Hugging Face round trips (issue 21): a patched architecture registered as a timm model name,
and a patched transformers model's save_pretrained folder rebuilt by load() and from_pretrained, bitwise."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from attn_inject import AttnInjectError, eject, inject, load, register_timm_model, save, unregister_timm_model
from attn_inject.surgery.recipe import recipe_of
from attn_inject.testing import look_trained, move_off_identity
from tests.helpers.running import outputs

X = torch.randn(2, 3, 64, 64)


@pytest.fixture
def resnet18_eca():
    name = register_timm_model("attn_inject_test_resnet18_eca", base="resnet18", block="eca", after="basic")
    yield name
    unregister_timm_model(name)
    assert not timm.is_model(name)


def test_a_registered_timm_name_builds_the_patched_model_and_loads_its_file_bitwise(resnet18_eca, tmp_path):
    model = timm.create_model(resnet18_eca, num_classes=10)
    assert type(model).__name__ == "ResNet" and model.num_classes == 10
    assert len(recipe_of(model).modules) == 8 and recipe_of(model).arch == "resnet18"
    look_trained(model)
    move_off_identity(model)
    save(model, tmp_path / "resnet18-eca.safetensors")

    overlay = dict(file=str(tmp_path / "resnet18-eca.safetensors"))
    again = timm.create_model(resnet18_eca, num_classes=10, pretrained=True, pretrained_cfg_overlay=overlay)
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(outputs(again.eval(), X), outputs(model.eval(), X))
    assert torch.equal(outputs(load(tmp_path / "resnet18-eca.safetensors"), X), outputs(model, X))


def test_a_registered_timm_name_puts_identity_blocks_on_a_plain_checkpoint_of_its_base(resnet18_eca, tmp_path):
    base = look_trained(timm.create_model("resnet18"))
    save_file(base.state_dict(), str(tmp_path / "resnet18.safetensors"))
    overlay = dict(file=str(tmp_path / "resnet18.safetensors"))
    patched = timm.create_model(resnet18_eca, pretrained=True, pretrained_cfg_overlay=overlay)
    assert len(recipe_of(patched).modules) == 8
    assert torch.equal(outputs(patched.eval(), X), outputs(base, X))


def test_register_timm_model_checks_everything_up_front(resnet18_eca, tmp_path):
    with pytest.raises(AttnInjectError, match=r"timm already has a model called 'resnet18'"):
        register_timm_model("resnet18", base="resnet18", block="eca", after="basic")
    with pytest.raises(AttnInjectError, match=r"unknown timm model 'resnet_nope'"):
        register_timm_model("mine", base="resnet_nope", block="eca", after="basic")
    with pytest.raises(AttnInjectError, match=r"unknown block 'bam'"):
        register_timm_model("mine", base="resnet18", block="bam", after="basic")
    assert not timm.is_model("mine")
    save_file(timm.create_model("resnet34").state_dict(), str(tmp_path / "resnet34.safetensors"))
    overlay = dict(file=str(tmp_path / "resnet34.safetensors"))
    with pytest.raises(AttnInjectError, match=rf"fits neither resnet18 nor {resnet18_eca} \(unexpected \['layer1.2"):
        timm.create_model(resnet18_eca, pretrained=True, pretrained_cfg_overlay=overlay)


def _tiny_hf_resnet():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2], num_labels=3)
    return look_trained(transformers.ResNetForImageClassification(config))


def test_save_pretrained_of_a_patched_transformers_model_round_trips_bitwise(tmp_path):
    from attn_inject.integrations.hugging_face import from_pretrained

    model = inject(_tiny_hf_resnet(), "eca", after="residual", example_input=X[:1])
    move_off_identity(model)
    expected = outputs(model.eval(), X).logits
    model.save_pretrained(tmp_path / "patched")
    assert "attn_inject" in (tmp_path / "patched" / "config.json").read_text()

    for rebuilt in (load(tmp_path / "patched"), from_pretrained(tmp_path / "patched").eval()):
        assert type(rebuilt).__name__ == "ResNetForImageClassification"
        assert sorted(recipe_of(rebuilt).modules) == sorted(recipe_of(model).modules)
        assert torch.equal(outputs(rebuilt, X).logits, expected)

    eject(model)  # a plain model again: its config no longer claims blocks
    model.save_pretrained(tmp_path / "plain")
    assert "attn_inject" not in (tmp_path / "plain" / "config.json").read_text()
    with pytest.raises(AttnInjectError, match=r"config.json holds no attn_inject recipe: not a patched model"):
        load(tmp_path / "plain")


def test_the_trainer_resumes_a_patched_transformers_model_with_its_blocks(tmp_path):
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    from transformers import Trainer, TrainingArguments

    model = inject(_tiny_hf_resnet(), "eca", after="residual", example_input=X[:1])
    data = [{"pixel_values": torch.randn(3, 64, 64), "labels": torch.tensor(i % 3)} for i in range(8)]

    def trainer(steps: int) -> Trainer:
        args = TrainingArguments(
            output_dir=str(tmp_path / "run"), max_steps=steps, save_steps=2, per_device_train_batch_size=4,
            use_cpu=True, report_to=[], seed=0, learning_rate=0.1,
        )  # fmt: skip
        return Trainer(model=model, args=args, train_dataset=data)

    trainer(2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert "attn_inject" in (checkpoint / "config.json").read_text()
    saved = load(checkpoint)
    blocks = set(recipe_of(model).modules)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.state_dict().items())
    trainer(4).train(resume_from_checkpoint=str(checkpoint))
    assert set(recipe_of(model).modules) == blocks
    moved = load(tmp_path / "run" / "checkpoint-4")
    changed = [k for k, v in moved.state_dict().items() if any(k.startswith(f"{b}.") for b in blocks)]
    assert changed and any(not torch.equal(moved.state_dict()[k], saved.state_dict()[k]) for k in changed)
