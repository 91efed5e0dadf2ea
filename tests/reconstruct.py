"""Rebuild timm's / torchvision's hand-written attention nets by injection (tests and benchmark share it).

Each case: the hand-written model (weights made to look trained), its attention-free counterpart
holding the same weights, and the rule that puts the blocks back. Weights of the new blocks are
loaded by an explicit key mapping: the hand-written model's attention tensors and the patched
model's new tensors, each in state_dict order, paired one to one with equal shapes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import timm
import torch
import torchvision
from torch import nn

from attn_inject import inject


def look_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm weights and running stats (fresh nets zero-init norms and look like identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _strip(attr: str, path_of_block: Callable[[str, nn.Module], bool] = lambda p, m: True):
    """An attention-free copy: every ``attr`` child (the SE module) replaced by nn.Identity."""

    def strip(hand: nn.Module) -> nn.Module:
        plain = copy.deepcopy(hand)
        for path, module in list(plain.named_modules()):
            child = getattr(module, attr, None) if isinstance(module, nn.Module) else None
            if isinstance(child, nn.Module) and not isinstance(child, nn.Identity) and path_of_block(path, module):
                setattr(module, attr, nn.Identity())
        return plain

    return strip


def _timm_twin(name: str):
    """The attention-free timm model of the same design, holding the hand-written one's weights."""

    def twin(hand: nn.Module) -> nn.Module:
        plain = timm.create_model(name).eval()
        state = hand.state_dict()
        plain.load_state_dict({k: state[k] for k in plain.state_dict()})
        return plain

    return twin


def _torchvision_efficientnet_b0_strip(hand: nn.Module) -> nn.Module:
    plain = copy.deepcopy(hand)
    for module in plain.modules():
        if isinstance(module, torchvision.models.efficientnet.MBConv):
            block = module.block
            for i, child in enumerate(block):
                if isinstance(child, torchvision.ops.SqueezeExcitation):
                    block[i] = nn.Identity()
    return plain


@dataclass(frozen=True)
class Case:
    name: str  # the hand-written model
    hand: Callable[[], nn.Module]
    plain: Callable[[nn.Module], nn.Module]
    block: str
    rule: str
    sites: int
    include: Callable[[nn.Module], tuple[str, ...]] = lambda hand: ()  # blocks to patch, from the hand-written net


def _mobilenetv3_se_blocks(hand: nn.Module) -> tuple[str, ...]:
    return tuple(p for p, m in hand.named_modules() if isinstance(getattr(m, "se", None), nn.Module)
                 and not isinstance(m.se, nn.Identity))  # fmt: skip


CASES = [
    Case("timm:regnety_002", lambda: timm.create_model("regnety_002"), _timm_twin("regnetx_002"), "se", "regnet_se", 13),
    Case("timm:efficientnet_b0", lambda: timm.create_model("efficientnet_b0"), _strip("se"), "se", "mbconv_se", 16),
    Case("timm:mobilenetv3_large_100", lambda: timm.create_model("mobilenetv3_large_100"), _strip("se"), "se",
         "mobilenetv3_se", 8, _mobilenetv3_se_blocks),
    Case("timm:seresnet18", lambda: timm.create_model("seresnet18"), _timm_twin("resnet18"), "se", "basic", 8),
    Case("timm:ecaresnet26t", lambda: timm.create_model("ecaresnet26t"), _timm_twin("resnet26t"), "eca", "bottleneck", 8),
    Case("torchvision:efficientnet_b0", lambda: torchvision.models.efficientnet_b0(), _torchvision_efficientnet_b0_strip,
         "se", "mbconv_se", 16),
]  # fmt: skip


def attention_keys(hand: nn.Module, plain: nn.Module) -> list[str]:
    """The hand-written model's attention tensors (its keys the attention-free model lacks), in order."""
    plain_keys = set(plain.state_dict())
    return [k for k in hand.state_dict() if k not in plain_keys]


def load_by_order(patched: nn.Module, plain: nn.Module, hand: nn.Module) -> list[tuple[str, str]]:
    """Load the hand-written model's weights into the patched one: shared keys by name, the new
    blocks' tensors by order and shape. Returns the (hand key, patched key) pairs."""
    hand_state, plain_keys = hand.state_dict(), set(plain.state_dict())
    new_keys = [k for k in patched.state_dict() if k not in plain_keys]
    old_keys = attention_keys(hand, plain)
    assert len(new_keys) == len(old_keys), (len(new_keys), len(old_keys))
    pairs = list(zip(old_keys, new_keys))
    mismatched = [(a, b) for a, b in pairs if hand_state[a].shape != patched.state_dict()[b].shape]
    assert not mismatched, mismatched[:3]
    state = {k: hand_state[k] for k in plain_keys} | {b: hand_state[a] for a, b in pairs}
    patched.load_state_dict(state, strict=True)
    return pairs


EXAMPLE = torch.randn(1, 3, 64, 64)  # the example forward for injection (small: analysis time grows with it)


def rebuild(case: Case, init: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(hand-written, attention-free, patched) for a case; the patched model has ``init`` blocks."""
    torch.manual_seed(0)
    hand = look_trained(case.hand())
    plain = case.plain(hand).eval()
    patched = inject(copy.deepcopy(plain), case.block, after=case.rule, include=case.include(hand), init=init,
                     example_input=EXAMPLE)  # fmt: skip
    return hand, plain, patched.eval()
