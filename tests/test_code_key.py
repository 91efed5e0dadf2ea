"""graph/code_key.py and splice's compile cache: modules built alike share one compiled forward.

The key must be equal exactly where fx generates the same source: copies of one trace share it;
another target, another constant (0.0 against -0.0), another node name or a container argument's
codegen do not.
"""

from __future__ import annotations

import copy

import timm
import torch
from torch import fx, nn

from attn_inject import inject
from attn_inject.graph.code_key import code_key
from attn_inject.patched import PatchedForward
from attn_inject.testing import look_trained


class Scaled(nn.Module):
    def __init__(self, scale: float, act=torch.relu):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.scale, self.act = scale, act

    def forward(self, x):
        return self.act(self.conv(x) * self.scale) + x


class Listed(nn.Module):
    def forward(self, xs: list[torch.Tensor]):
        return xs[0] + xs[1]


def _graph(module: nn.Module, **concrete) -> fx.Graph:
    return fx.Tracer().trace(module, concrete_args=concrete or None)


def test_copies_of_one_trace_have_one_key_and_the_same_source():
    graph = _graph(Scaled(0.5))
    twin = copy.deepcopy(graph)
    assert code_key(graph) == code_key(twin) is not None
    assert graph.python_code("self").src == twin.python_code("self").src
    assert code_key(_graph(Scaled(0.5))) == code_key(graph)  # another module of the same structure


def test_what_changes_the_code_changes_the_key():
    graph = _graph(Scaled(0.5))
    assert code_key(_graph(Scaled(0.25))) != code_key(graph)  # another constant
    assert code_key(_graph(Scaled(0.0))) != code_key(_graph(Scaled(-0.0)))  # 0.0 == -0.0, not in code
    assert code_key(_graph(Scaled(0.5, torch.sigmoid))) != code_key(graph)  # another function
    renamed = copy.deepcopy(graph)
    next(n for n in renamed.nodes if n.op == "call_module").name = "conv_other"
    assert code_key(renamed) != code_key(graph)
    assert code_key(_graph(Listed())) is not None
    flattened = fx.Tracer().trace(Listed(), concrete_args={"xs": [fx.PH, fx.PH]})
    assert code_key(flattened) is None  # a pytree codegen: its specs belong to each graph


def test_resnet50_compiles_once_per_structure_and_stays_bitwise():
    model = look_trained(timm.create_model("resnet50").eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    inject(model, "eca", after="bottleneck", example_input=x)
    codes = {
        name: next(iter(m.__dict__["forward"].variants.values()))
        for name, m in model.named_modules()
        if isinstance(m.__dict__.get("forward"), PatchedForward)
    }
    assert len(codes) == 16
    # 8 structures (sizes differ by stage), 2 sources: the first block of a stage (its downsample) and the rest
    assert len({id(c) for c in codes.values()}) == 2
    assert codes["layer1.1"] is codes["layer1.2"] is codes["layer4.2"] and codes["layer1.0"] is codes["layer3.0"]
    assert codes["layer1.0"] is not codes["layer1.1"] and "downsample" in codes["layer1.0"].src
    with torch.no_grad():
        assert torch.equal(model(x), before)
        model.layer3[2].se.conv.weight.fill_(0.3)  # one block moved off identity: only its module changes
        moved = model(x)
    assert not torch.equal(moved, before)
    assert torch.equal(model.layer3[1].se.conv.weight, torch.zeros_like(model.layer3[1].se.conv.weight))
