"""What the plan reports is true: modules that ran are never called unreached, and a refusal names
what the model has (token residuals are not maps; modules fx could not trace)."""

import pytest
import timm
import torch
import torchaudio

from attn_inject import AttnInjectError, plan
from attn_inject.testing import look_trained
from tests.helpers.running import inject_exactly

X = torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("name", ["hgnetv2_b0", "efficientvit_b0"])
def test_a_head_that_ran_is_reached(name):
    """timm's forward runs forward_head after forward_features; these heads hold convs."""
    model = look_trained(timm.create_model(name, num_classes=10))
    report = plan(model, "eca", after="conv", example_input=X)
    assert report.unreached == ()  # both said "head" before
    head_sites = [s.module_name for s in report if s.path.startswith("head.")]
    assert head_sites == (["head.in_conv.conv_eca"] if name == "efficientvit_b0" else [])
    if head_sites:
        inject_exactly(model, X, "eca", after="conv", example_input=X)


def test_token_residuals_are_not_called_maps():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    with pytest.raises(AttnInjectError) as info:
        plan(model, "eca", after="residual", example_input=torch.randn(1, 3, 32, 32))
    assert "residual add is on a 3-D tensor [1, 17, 192], not an NCHW map" in str(info.value)
    assert "1-D" not in str(info.value)


def test_convtasnet_refusal_names_its_untraced_modules():
    """Its residual adds sit in a module fx cannot run as traced (the last layer returns None); its
    1-D convs run conv -> PReLU -> GroupNorm, not a conv unit."""
    model = torchaudio.models.ConvTasNet(
        num_sources=2, enc_kernel_size=16, enc_num_feats=32, msk_kernel_size=3, msk_num_feats=16,
        msk_num_hidden_feats=32, msk_num_layers=2, msk_num_stacks=1,
    ).eval()  # fmt: skip
    with pytest.raises(
        AttnInjectError,
        match=r"matched nothing in ConvTasNet; the model contains: no residual blocks or conv units; 2 module\(s\) "
        r"could not be traced by torch\.fx \(e\.g\. <model>: TraceError: symbolically traced variables cannot be "
        r"used as inputs to control flow\)$",
    ):
        plan(model, "eca", after="residual", example_input=torch.randn(1, 1, 800))
