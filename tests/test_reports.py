"""What the plan reports is true: modules that ran are never called unreached, and a refusal names
what the model has (residuals on 1-D or 3-D maps, convolutions of those dims)."""

import pytest
import timm
import torch
import torchaudio
from torch import nn

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


class Residual(nn.Module):
    def __init__(self, conv: type[nn.Module], norm: type[nn.Module], c: int):
        super().__init__()
        self.conv, self.norm = conv(c, c, 3, padding=1, bias=False), norm(c)

    def forward(self, x):
        return x + self.norm(self.conv(x))


def resnet(dims: int) -> nn.Module:
    conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    return nn.Sequential(conv(1, 8, 3, padding=1), Residual(conv, norm, 8), Residual(conv, norm, 8)).eval()


@pytest.mark.parametrize(
    "dims,shape,words",
    [(1, (1, 1, 32), r"1-D maps \(NCL\)"), (3, (1, 1, 4, 8, 8), r"3-D maps \(NCDHW\)")],
)
def test_residuals_on_1d_or_3d_maps_are_named_in_the_refusal(dims, shape, words):
    model = resnet(dims)
    with pytest.raises(
        AttnInjectError,
        match=rf"matched nothing in Sequential; the model contains: no residual blocks or conv units; "
        rf"2 residual add\(s\) are on {words}, which attn_inject does not patch yet; 2 residual add\(s\) were not "
        rf"usable \(e\.g\. 1: residual add is on a {dims}-D map \[1, 8, ",
    ):
        plan(model, "eca", after="residual", example_input=torch.randn(shape))


def test_token_residuals_are_not_called_maps():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    with pytest.raises(AttnInjectError) as info:
        plan(model, "eca", after="residual", example_input=torch.randn(1, 3, 32, 32))
    assert "residual add is on a 3-D tensor [1, 17, 192], not an NCHW map" in str(info.value)
    assert "1-D" not in str(info.value)


def test_convtasnet_refusal_names_its_1d_convolutions():
    """Its residual adds sit in a module fx cannot run as traced (the last layer returns None)."""
    model = torchaudio.models.ConvTasNet(
        num_sources=2, enc_kernel_size=16, enc_num_feats=32, msk_kernel_size=3, msk_num_feats=16,
        msk_num_hidden_feats=32, msk_num_layers=2, msk_num_stacks=1,
    ).eval()  # fmt: skip
    with pytest.raises(
        AttnInjectError,
        match=r"matched nothing in ConvTasNet; the model contains: no residual blocks or conv units; its 11 "
        r"convolutions are on 1-D maps \(NCL\), which attn_inject does not patch yet",
    ):
        plan(model, "eca", after="residual", example_input=torch.randn(1, 1, 800))
