"""The example forward with keyword arguments (``example_kwargs=``): a dict or a processor's output
(transformers' BatchFeature), for analysis, verification and the recipe that load() replays."""

import pytest
import torch
import transformers as hf

from attn_inject import AttnInjectError, inject, load, plan, save
from attn_inject.finetune import attention_blocks
from attn_inject.testing import blocks_not_run, look_trained, move_off_identity
from tests.helpers.tiny_models import KeywordOnlyNet

X = torch.randn(1, 3, 64, 64)


def test_transformers_resnet_fed_a_processor_style_dict():
    model = look_trained(hf.ResNetForImageClassification(hf.ResNetConfig()))  # the default config: ResNet-50
    inputs = hf.BatchFeature({"pixel_values": X})  # what an image processor returns
    with pytest.raises(
        AttnInjectError,
        match=r"failed: AttributeError: 'dict' object has no attribute 'shape'\. example_input= is passed as "
        r"positional arguments, a dict too; pass a dict of keyword arguments \(a processor's output\) as "
        r"example_kwargs= instead\.$",
    ):
        plan(model, "eca", after="bottleneck", example_input=dict(inputs))
    with torch.no_grad():
        before = model(**inputs).logits
    inject(model, "eca", after="bottleneck", example_kwargs=inputs)
    assert len(attention_blocks(model)) == 16
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert blocks_not_run(model, X) == 0
    move_off_identity(model)
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, before)


def test_a_keyword_only_forward_is_analysed_patched_and_reloaded(tmp_path):
    model = look_trained(KeywordOnlyNet())
    with torch.no_grad():
        before = model(pixel_values=X, scale=2.0)
    inject(model, "se", after="residual", example_kwargs={"pixel_values": X})
    assert [type(m).__name__ for m in model.block.children()][-1] == "SqueezeExcite"
    with torch.no_grad():
        assert torch.equal(model(pixel_values=X, scale=2.0), before)
    move_off_identity(model)
    with torch.no_grad():
        moved = model(pixel_values=X, scale=2.0)
    assert not torch.equal(moved, before)
    save(model, tmp_path / "kw.safetensors")
    loaded = load(tmp_path / "kw.safetensors", "tests.helpers.tiny_models:keyword_only_net")  # replays with kwargs
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=X, scale=2.0), moved)


@pytest.mark.parametrize("bad", [[("pixel_values", X)], {1: X}, X])
def test_example_kwargs_must_be_a_mapping_of_names(bad):
    with pytest.raises(AttnInjectError, match=r"^example_kwargs= must be a mapping of argument names to values"):
        plan(KeywordOnlyNet(), "eca", after="residual", example_kwargs=bad)
