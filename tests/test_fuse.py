"""Blocks survive methods that swap a module's forward after inject (issue 15, point 2): ultralytics'
``fuse()`` installs each Conv's ``forward_fuse`` as its forward, which inject patched too; where an
alternate forward cannot hold a block, inject refuses the placement, naming the method."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from attn_inject import AttnInjectError, eject, inject
from attn_inject.patched import PatchedForward, patched_forward
from attn_inject.testing import counting_block_calls, look_trained, move_off_identity
from tests.helpers.running import outputs

X = torch.randn(2, 3, 16, 16)


class FusableConv(nn.Module):
    """An ultralytics-style conv unit: fuse() folds bn into conv and swaps in forward_fuse."""

    def __init__(self, c1: int, c2: int, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class NoActFuse(FusableConv):
    def forward(self, x):
        return self.bn(self.conv(x))

    def forward_fuse(self, x):
        return self.conv(x)


class LossyFuse(FusableConv):
    def forward_fuse(self, x):  # skips the activation the block comes after
        return self.conv(x) * 2


class StaticFuse(FusableConv):
    @staticmethod
    def forward_fuse(x, w):  # another signature (ultralytics' BNContrastiveHead has one like it)
        return x * w


def net(unit=FusableConv):
    return nn.Sequential(unit(3, 8), unit(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def fuse(model: nn.Module) -> nn.Module:
    """What ultralytics' BaseModel.fuse() does to each Conv."""
    for m in model.modules():
        if isinstance(m, FusableConv) and hasattr(m, "bn"):
            m.conv = fuse_conv_bn_eval(m.conv, m.bn)
            del m.bn
            m.forward = m.forward_fuse
    return model


@pytest.mark.parametrize("unit", [FusableConv, NoActFuse])
def test_blocks_survive_fuse_and_eject_restores_both_methods(unit):
    model = look_trained(net(unit))
    inject(model, "eca", after="conv", example_input=X[:1])
    assert all(isinstance(m.__dict__["forward_fuse"], PatchedForward) for m in model[:2])
    move_off_identity(model)
    expected = outputs(model, X)
    fused = fuse(copy.deepcopy(model))
    with counting_block_calls(fused) as calls:
        actual = outputs(fused, X)
    assert list(calls.values()) == [1, 1]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    lost = fuse(eject(copy.deepcopy(model)))  # blocks gone: fusing shows what a lost block costs
    assert (outputs(lost, X) - expected).abs().max() > 1e-3
    eject(model)
    assert all("forward" not in m.__dict__ and "forward_fuse" not in m.__dict__ for m in model[:2])


def test_a_block_after_a_folded_norm_goes_after_the_conv_it_was_folded_into():
    model = inject(look_trained(net(NoActFuse)), "eca", after="conv", example_input=X[:1])
    code = patched_forward(model[0], "forward_fuse").variants
    assert "self.conv_eca(conv)" in next(iter(code.values())).src.replace(" ", "")


@pytest.mark.parametrize(
    ("unit", "reason"),
    [
        (LossyFuse, r"the value act that a block takes has no counterpart"),
        (StaticFuse, r"it is a staticmethod, not a method fx can trace"),
    ],
)
def test_a_block_an_alternate_forward_would_lose_is_refused_naming_the_method(unit, reason):
    model = look_trained(net(unit))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        AttnInjectError,
        match=rf"blocks in 0 \({unit.__name__}\.forward\) and 1 more module\(s\) would be "
        rf"lost when fuse\(\) swaps in {unit.__name__}\.forward_fuse: {reason}.*exclude=\['0.conv', '1.conv'\]",
    ):
        inject(model, "eca", after="conv", example_input=X[:1])
    assert all("forward" not in m.__dict__ for m in model[:2])
    assert model.state_dict().keys() == before.keys()


def test_ultralytics_fuse_keeps_every_block_of_a_patched_yolov8n(yolo_sandbox):
    from ultralytics import YOLO

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = look_trained(YOLO("yolov8n.yaml", verbose=False).model)
    inject(model, "eca", after="conv", example_input=x)
    assert move_off_identity(model) == 57
    expected = outputs(model, x)[0]
    fused = copy.deepcopy(model)
    with counting_block_calls(fused) as calls:
        fused.fuse(verbose=False)
        assert fused.is_fused()
        actual = outputs(fused, x)[0]
    assert len(calls) == 57 and all(n == 1 for n in calls.values())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    lost = eject(copy.deepcopy(model)).fuse(verbose=False)
    assert (outputs(lost, x)[0] - expected).abs().max() > 1e-2
