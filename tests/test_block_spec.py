"""A block registered by a user gets the built-ins' treatment from its BlockSpec: site facts and
slot names in plan, the in-place residual add in splice, no weight decay on its gate layer in
param_groups, the slot given back by eject."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from attn_inject import AttnInjectError, eject, inject, plan
from attn_inject.blocks import block_spec, register_block, registered_block, spec_of
from attn_inject.finetune import param_groups
from attn_inject.testing import look_trained, move_off_identity


class Rescale(nn.Module):
    """A user's gate: x * (1 + tanh(proj(relu(pre(GAP(x)))))), identity with ``proj`` at zero."""

    def __init__(self, channels: int, block_in_channels: int | None = None, init: str = "identity"):
        super().__init__()
        self.block_in_channels = block_in_channels
        self.pre = nn.Conv2d(channels, 4, 1)
        self.proj = nn.Conv2d(4, channels, 1)
        if init == "identity":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(torch.relu(self.pre(x.mean((2, 3), keepdim=True))))
        return torch.addcmul(x, x, torch.tanh(z))


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def resnet() -> nn.Module:
    return look_trained(timm.create_model("test_resnet", num_classes=10))


def forward_sources(model: nn.Module) -> str:
    return "\n".join(
        code.src for m in model.modules() if "forward" in m.__dict__ for code in m.__dict__["forward"].variants.values()
    )


@pytest.mark.parametrize("fresh_output", [True, False])
def test_a_users_block_gets_the_built_ins_treatment(fresh_output):
    with registered_block("rescale", Rescale, gate="proj", fresh_output=fresh_output):
        spec = block_spec("rescale")
        assert (spec.gate, spec.fresh_output, spec.site_facts, spec.slots) == (
            "proj",
            fresh_output,
            ("block_in_channels",),
            ("se",),
        )

        model = resnet()
        original_keys = list(model.state_dict())
        with torch.no_grad():
            before = model(X)
        the_plan = plan(model, "rescale", after="residual")
        # plan: the site fact the block takes, and timm's empty `se` slot as the name at a branch end
        assert [(s.module_name, dict(s.options)) for s in the_plan] == [
            ("layer1.0.se", {"block_in_channels": 32}),
            ("layer2.0.se", {"block_in_channels": 32}),
            ("layer3.0.se", {"block_in_channels": 48}),
            ("layer4.0.se", {"block_in_channels": 192}),
        ]
        inject(model, "rescale", after="residual")
        blocks = {name: m for name, m in model.named_modules() if isinstance(m, Rescale)}
        assert {name: b.block_in_channels for name, b in blocks.items()} == {
            "layer1.0.se": 32,
            "layer2.0.se": 32,
            "layer3.0.se": 48,
            "layer4.0.se": 192,
        }
        assert all(spec_of(b) is spec for b in blocks.values())
        with torch.no_grad():
            assert torch.equal(model(X), before)
        # splice: the residual add writes into the block's output only when the spec says it is fresh
        assert ("add_shortcut" in forward_sources(model)) == fresh_output
        # param_groups: the gate layer is spared from weight decay, the block's other layer is not
        groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, lr=1e-3)}
        gate, pre = blocks["layer1.0.se"].proj.weight, blocks["layer1.0.se"].pre.weight
        assert id(gate) in groups["attention_no_decay"] and id(pre) in groups["attention"]
        # the blocks matter once they move, and training works through them (on a copy)
        moved = copy.deepcopy(model)
        move_off_identity(moved)
        with torch.no_grad():
            assert not torch.equal(moved(X), before)
        moved.train()(X).sum().backward()
        assert all(p.grad is not None for m in moved.modules() if isinstance(m, Rescale) for p in m.parameters())
        # eject: the slot is given back, the original keys and outputs too
        eject(model.eval())
        assert model.layer1[0].se is None and list(model.state_dict()) == original_keys
        with torch.no_grad():
            assert torch.equal(model(X), before)


def test_a_gate_that_is_not_a_submodule_is_refused():
    with pytest.raises(
        AttnInjectError, match=r"^register_block\('rescale2', gate='fc9'\): Rescale has no submodule 'fc9'"
    ):
        register_block("rescale2", gate="fc9")(Rescale)
    with pytest.raises(AttnInjectError, match=r"unknown block 'rescale2'"):
        block_spec("rescale2")


def test_the_built_in_specs():
    se, eca = block_spec("se"), block_spec("eca")
    se_facts = ("block_in_channels", "spatial_dims")
    assert (se.gate, se.fresh_output, se.site_facts, se.slots) == ("fc2", True, se_facts, ("se",))
    assert (eca.gate, eca.fresh_output, eca.site_facts, eca.slots) == ("conv", True, ("spatial_dims",), ("se",))
