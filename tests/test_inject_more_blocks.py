"""Every new block through inject on test models with trained-looking weights: bitwise at insertion,
every block runs, moved off identity the output changes; a file round trip; and this library's own
blocks are not "existing attention" to a later inject (stack=False)."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from attn_inject import AttnInjectError, inject, load, plan, save
from attn_inject.blocks import spec_of
from attn_inject.testing import blocks_not_run, look_trained, move_off_identity

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
NEW = ["cbam", "coord", "gc", "gct", "ge", "simam"]
# (model, rule, sites): a ResNet's residual branches (default run); ConvNeXt's (LayerNorm, layer scales,
# NHWC inside the block; slow: about 10 s a block)
MODELS = [("test_resnet", "residual", 4), pytest.param("test_convnext", "residual", 9, marks=pytest.mark.slow)]


def trained(name: str) -> torch.nn.Module:
    return look_trained(timm.create_model(name, num_classes=10), X)


@pytest.mark.parametrize("model_name,rule,sites", MODELS)
@pytest.mark.parametrize("block", NEW)
def test_each_block_injects_bitwise_runs_and_matters(block, model_name, rule, sites):
    model = trained(model_name)
    with torch.no_grad():
        before = model(X)
    inject(model, block, after=rule, example_input=X[:1])
    injected = [m for m in model.modules() if spec_of(m) is not None]
    assert len(injected) == sites and all(spec_of(m).name == block for m in injected)
    with torch.no_grad():
        assert torch.equal(model(X), before)
    assert blocks_not_run(model, X) == 0
    assert move_off_identity(model) == sites
    with torch.no_grad():
        assert not torch.equal(model(X), before)


def test_a_new_block_saves_and_loads(tmp_path):
    model = trained("test_resnet")
    inject(model, "cbam", after="residual", example_input=X[:1], spatial_kernel_size=3, rd_ratio=0.25)
    move_off_identity(model)
    with torch.no_grad():
        expected = model(X)
    loaded = load(save(model, tmp_path / "cbam.safetensors"))
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert loaded.layer1[0].se.spatial.conv.kernel_size == (3, 3)
    with torch.no_grad():
        assert torch.equal(loaded(X), expected)


def test_own_blocks_are_not_existing_attention():
    model = trained("test_resnet")
    inject(model, "cbam", after="residual", example_input=X[:1])
    the_plan = plan(model, "gct", after="residual", example_input=X[:1])
    assert len(the_plan.sites) == 4 and not the_plan.attended
    # timm's own CbamModule is existing attention: skipped unless stack=True
    timm_cbam = look_trained(timm.create_model("test_resnet", block_args=dict(attn_layer="cbam")), X)
    with pytest.raises(AttnInjectError, match=r"4 place\(s\) already hold channel attention .*CbamModule"):
        plan(timm_cbam, "cbam", after="residual", example_input=X[:1])
    assert len(plan(timm_cbam, "cbam", after="residual", example_input=X[:1], stack=True).sites) == 4


@pytest.mark.slow
def test_coordinate_attention_mobilenet_v2_has_the_papers_parameter_count():
    """Hou et al. 2021: MobileNetV2 3.5M -> 3.95M with CA where the authors' mbv2_ca.py puts it."""
    model = torchvision.models.mobilenet_v2()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    inject(model, "coord", after="mbconv_se", exclude="features.1", init="paper", example_input=X[:1])
    assert len([m for m in model.modules() if spec_of(m) is not None]) == 16
    assert sum(p.numel() for p in model.parameters()) == 3_950_648  # 3.95M


def test_a_block_with_a_norm_injects_into_a_training_model_with_1x1_maps():
    """plan measures each block's cost on a batch of one: in train mode CBAM's spatial BatchNorm
    would see one value per channel at a 1x1 site and refuse (the plan builds it in eval mode)."""
    model = timm.create_model("test_resnet").train()  # a 32x32 input reaches layer4 as 1x1
    x = torch.randn(2, 3, 32, 32)
    inject(model, "cbam", after="residual", example_input=x[:1])
    assert model.training and len([m for m in model.modules() if spec_of(m) is not None]) == 4
    model(x).sum().backward()
