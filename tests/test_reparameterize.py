"""Reparameterizable nets (RepVGG, MobileOne, FastViT, RepGhost): a module that folds its parallel
branches into one conv is one unit, its block goes after it (never inside a branch), and
``timm.utils.reparameterize_model`` after inject keeps every block and the function."""

import pytest
import timm
import torch
from torch import nn

from attn_inject import inject, plan
from attn_inject.finetune import attention_blocks
from attn_inject.testing import blocks_not_run, look_trained, move_off_identity
from tests.helpers.running import inject_exactly
from tests.helpers.tiny_models import conv_bn

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))

# name, rule, sites, places skipped for the model's own SE, modules that fold, tolerance of the
# reparameterized output (relative to its largest value: the folds round differently, and moved
# gates amplify that; mobileone_s0's own fold differs by 8e-5 of it before any block)
CASES = [
    ("repvgg_a0", "conv", 22, 0, 22, 1e-4),
    ("fastvit_t8", "residual", 10, 0, 20, 1e-4),
    ("repghostnet_050", "residual", 9, 7, 32, 1e-4),
    pytest.param("mobileone_s0", "conv", 43, 0, 43, 1e-2, marks=pytest.mark.slow),
]


def folding_owner(model: nn.Module, name: str) -> bool:
    """Whether the block ``name`` sits inside a module that folds (its forward would be replaced)."""
    parts = name.split(".")
    return any(
        callable(getattr(model.get_submodule(".".join(parts[:i])), "reparameterize", None))
        for i in range(1, len(parts))
    )


@pytest.mark.parametrize("name,rule,sites,attended,folds,tolerance", CASES)
def test_blocks_survive_reparameterize_model(name, rule, sites, attended, folds, tolerance):
    model = look_trained(timm.create_model(name, num_classes=10), X)
    report = plan(model, "eca", after=rule, example_input=X[:1])
    assert len(report) == sites and len(report.attended) == attended
    assert len(report.folded) == folds and {m for _, m in report.folded} == {"reparameterize"}
    assert "fold their branches into one conv" in report.note("folded")
    with torch.no_grad():
        original = model(X)
    inject(model, "eca", after=rule, example_input=X[:1])
    with torch.no_grad():
        assert torch.equal(model(X), original)
    blocks = sorted(attention_blocks(model))
    assert len(blocks) == sites and not any(folding_owner(model, b) for b in blocks)
    move_off_identity(model)
    with torch.no_grad():
        patched = model(X)
    fused = timm.utils.reparameterize_model(model)  # a copy, folded: it crashed on the edited forwards
    assert sorted(attention_blocks(fused)) == blocks and blocks_not_run(fused, X) == 0
    with torch.no_grad():
        after = fused(X)
    assert (after - patched).abs().max() <= tolerance * patched.abs().max()
    assert not torch.equal(patched, original)  # the blocks act, before and after the fold


def test_an_already_reparameterized_model_gets_blocks_after_its_plain_conv_units():
    model = timm.utils.reparameterize_model(look_trained(timm.create_model("repvgg_a0", num_classes=10), X))
    report = plan(model, "eca", after="conv", example_input=X[:1])
    assert report.folded == () and len(report) == 22
    assert [s.module_name for s in report][:2] == ["stem.reparam_conv_eca", "stages.0.0.reparam_conv_eca"]
    inject_exactly(model, X, "eca", after="conv", example_input=X[:1])


class DiverseBranch(nn.Module):
    """mmcv style: ``switch_to_deploy()`` folds a 3x3 and a 1x1 branch into ``reparam``; no known class."""

    def __init__(self, c: int):
        super().__init__()
        self.k3, self.k1 = nn.Sequential(*conv_bn(c, c, 3)), nn.Sequential(*conv_bn(c, c, 1))
        self.act = nn.ReLU()

    def forward(self, x):
        if hasattr(self, "reparam"):
            return self.act(self.reparam(x))
        return self.act(self.k3(x) + self.k1(x))

    def switch_to_deploy(self):
        self.reparam = nn.Conv2d(self.k3[0].in_channels, self.k3[0].out_channels, 3, padding=1)
        with torch.no_grad():
            self.reparam.weight.zero_(), self.reparam.bias.zero_()
            for branch in (self.k3, self.k1):
                conv, bn = branch
                scale = bn.weight / (bn.running_var + bn.eps).sqrt()
                pad = (3 - conv.kernel_size[0]) // 2
                self.reparam.weight += nn.functional.pad(conv.weight * scale[:, None, None, None], [pad] * 4)
                self.reparam.bias += bn.bias - bn.running_mean * scale
        del self.k3, self.k1


class NotAFold(nn.Module):
    """Methods by a fold method's name that change nothing, or need arguments, are not folds."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = conv_bn(c, c)

    def forward(self, x):
        return x + self.bn(self.conv(x))

    def reparameterize(self):
        return None

    def fuse(self, other):
        raise AssertionError("never called without its argument")


def test_a_fold_is_told_by_what_the_method_does_not_by_class():
    model = look_trained(nn.Sequential(*conv_bn(3, 8), DiverseBranch(8), NotAFold(8), DiverseBranch(8)), X)
    report = plan(model, "se", after=["residual", "conv"], example_input=X[:1])
    assert report.folded == (("2", "switch_to_deploy"), ("4", "switch_to_deploy"))
    assert [(s.path, s.rule, s.module_name) for s in report] == [
        ("3", "residual", "3.se"),
        ("0", "conv", "0_se"),
        ("2", "conv", "2_se"),
        ("4", "conv", "4_se"),
        ("3.conv", "conv", "3.conv_se"),
    ]
    with torch.no_grad():
        before = model(X)
    inject(model, "se", after=["residual", "conv"], example_input=X[:1])
    move_off_identity(model)
    with torch.no_grad():
        patched = model(X)
    assert not torch.equal(patched, before)
    for module in (model[2], model[4]):
        module.switch_to_deploy()
    with torch.no_grad():
        assert torch.allclose(model(X), patched, rtol=1e-4, atol=1e-5)
    assert blocks_not_run(model, X) == 0


class ConvNorm(nn.Sequential):
    """timm's LeViT / RepViT style: ``fuse()`` returns the Conv2d that replaces it."""

    def __init__(self, c: int):
        super().__init__(*conv_bn(c, c))

    def fuse(self) -> nn.Module:
        return nn.utils.fusion.fuse_conv_bn_eval(self[0], self[1])


class ConvNormResidual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.branch = ConvNorm(c)

    def forward(self, x):
        return x + self.branch(x)


class FlagFold(nn.Module):
    """EfficientViM style: ``fuse()`` folds the identity into the conv and flips a flag that makes
    the forward skip the add; no child is replaced."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.fused = nn.Conv2d(c, c, 3, padding=1), False

    def forward(self, x):
        return self.conv(x) if self.fused else x + self.conv(x)

    def fuse(self) -> nn.Module:
        with torch.no_grad():
            self.conv.weight[:, :, 1, 1] += torch.eye(self.conv.in_channels)
        self.fused = True
        return self


def test_a_fold_into_a_conv_or_by_a_flag_keeps_the_function():
    model = look_trained(nn.Sequential(*conv_bn(3, 8), ConvNormResidual(8), FlagFold(8)), X)
    report = plan(model, "eca", after="residual", example_input=X[:1])
    assert report.folded == (("2.branch", "fuse"), ("3", "fuse"))
    assert [(s.path, s.module_name) for s in report] == [("2", "2.eca")]  # its branch folds into one conv
    inject(model, "eca", after="residual", example_input=X[:1])
    move_off_identity(model)
    with torch.no_grad():
        patched = model(X)
    fused = timm.utils.reparameterize_model(model)
    assert isinstance(fused[2].branch, nn.Conv2d) and fused[3].fused
    with torch.no_grad():
        assert torch.allclose(fused(X), patched, rtol=1e-4, atol=1e-5)
