"""The gated wrapper y = x + alpha * (f(x) - x): exact at alpha = 0, a user's block made the identity
by register_block(..., identity="gate"), verified by inject, saved, pickled and trained."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import timm
import torch
from torch import nn

from attn_inject import AttnInjectError, inject, plan
from attn_inject.blocks import (
    block_options,
    block_spec,
    gated_residual,
    get_block,
    register_block,
    registered_block,
    spec_of,
)
from attn_inject.blocks import gated as gated_module
from attn_inject.finetune import param_groups
from attn_inject.testing import blocks_not_run, look_trained, move_off_identity


class Squash(nn.Module):
    """A user's block that is far from the identity at init: x * sigmoid(conv(x)) + 1."""

    def __init__(self, channels: int, kernel_size: int = 3, shift: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x)) + self.shift


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gated_residual_is_x_at_alpha_0(dtype):
    x = (torch.randn(4, 8, 5, 5) * 100).to(dtype)
    fx = (torch.randn(4, 8, 5, 5) * 100).to(dtype)
    y = gated_residual(x, fx, torch.zeros((), dtype=dtype))
    assert torch.equal(y, x)
    assert not torch.equal(gated_residual(x, fx, torch.full((), 0.5, dtype=dtype)), x)
    # an infinite f(x) is the one case it cannot hold: 0 * inf is NaN
    assert gated_residual(x, torch.full_like(fx, float("inf")), torch.zeros((), dtype=dtype)).isnan().all()


def test_a_users_block_gated_is_the_identity_and_learns_through_alpha():
    with registered_block("squash", Squash, identity="gate", gate="conv"):
        spec = block_spec("squash")
        assert spec.cls is not Squash and spec.cls.wrapped is Squash  # type: ignore[attr-defined]
        assert spec.gate == ("alpha", "block.conv") and spec.fresh_output is False
        assert block_options("squash") == {"kernel_size": 3, "shift": 1.0, "init": "identity"}
        block = get_block("squash")(8, kernel_size=5)
        assert spec.gate_parameters(block) == ["alpha", "block.conv.weight", "block.conv.bias"]
        x = torch.randn(2, 8, 6, 6, requires_grad=True)
        g = torch.randn(2, 8, 6, 6)
        y = block(x)
        assert torch.equal(y, x)
        (y * g).sum().backward()
        assert torch.equal(x.grad, g) and block.alpha.grad.abs() > 0
        paper = get_block("squash")(8, init="paper")
        assert paper.alpha is None and torch.allclose(paper(x), Squash.forward(paper.block, x))
        with pytest.raises(AttnInjectError, match=r"block 'squash': option shift='1' must be float, not str"):
            inject(look_trained(timm.create_model("test_resnet")), "squash", after="residual", shift="1")
    assert not hasattr(gated_module, "Gated_squash")
    with pytest.raises(AttnInjectError, match=r"unknown block 'squash'"):
        block_spec("squash")


def test_inject_verifies_a_gated_users_block_and_it_saves_pickles_and_trains():
    with registered_block("squash", Squash, identity="gate"):
        model = look_trained(timm.create_model("test_resnet", num_classes=10))
        with torch.no_grad():
            before = model(X)
        inject(model, "squash", after="residual")
        blocks = {n: m for n, m in model.named_modules() if spec_of(m) is block_spec("squash")}
        assert sorted(blocks) == ["layer1.0.se", "layer2.0.se", "layer3.0.se", "layer4.0.se"]
        assert blocks_not_run(model, X) == 0
        with torch.no_grad():
            assert torch.equal(model(X), before)
        # pickled whole (the generated class is named in attn_inject.blocks.gated), and deep-copied
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        again = torch.load(buffer, weights_only=False)
        with torch.no_grad():
            assert torch.equal(again(X), before)
        assert type(again.layer1[0].se) is type(model.layer1[0].se)
        moved = copy.deepcopy(model)
        move_off_identity(moved)
        with torch.no_grad():
            assert not torch.equal(moved(X), before)
        names = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(moved, lr=1e-3)}
        assert id(moved.layer1[0].se.alpha) in names["attention_no_decay"]
        moved.train()(X).sum().backward()
        assert all(p.grad is not None for b in moved.modules() if spec_of(b) for p in b.parameters())


def test_the_gate_identity_is_checked():
    with pytest.raises(AttnInjectError, match=r"register_block\('x'\): unknown identity 'wrap'"):
        register_block("x", identity="wrap")
    with pytest.raises(
        AttnInjectError, match=r"breaks the block contract: every option after channels needs a default"
    ):

        class NoDefault(nn.Module):
            def __init__(self, channels: int, k: int):
                super().__init__()

        with registered_block("nodefault", NoDefault, identity="gate"):
            pass
    assert not [k for k in vars(gated_module) if k.startswith("Gated_") and k != "Gated_simam"]


def test_simam_comes_through_the_wrapper():
    spec = block_spec("simam")
    assert spec.cls.__qualname__ == "Gated_simam" and spec.gate == "alpha"
    assert pickle.loads(pickle.dumps(get_block("simam")(8))).alpha == 0
    assert len(plan(look_trained(timm.create_model("test_resnet")), "simam", after="residual").sites) == 4
