"""Modules built alike are traced once (trace_cache.py); anything a trace can read keeps them apart."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import attn_inject.graph.trace_cache as trace_cache
from attn_inject import inject, plan
from attn_inject.graph.analyze import analyze
from attn_inject.graph.nodes import META_KEY
from attn_inject.testing import look_trained, move_off_identity
from tests.helpers.tiny_models import InplaceBasic, conv_bn


@pytest.fixture
def traces(monkeypatch) -> list[str]:
    """The class names of the modules actually traced (not served from the cache)."""
    traced: list[str] = []
    real = trace_cache.trace_module

    def counting(module, *args, **kwargs):
        traced.append(type(module).__name__)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(trace_cache, "trace_module", counting)
    return traced


class ScaledBlock(nn.Module):
    """A residual block whose forward bakes two plain attributes and a child's attribute into its graph."""

    def __init__(self, c: int, scale: float, halve_if_dense: bool = False, groups: int = 1):
        super().__init__()
        self.conv, self.bn = conv_bn(c, c, 3, groups=groups)
        self.scale, self.halve_if_dense = scale, halve_if_dense

    def forward(self, x):
        y = self.bn(self.conv(x)) * self.scale
        if self.halve_if_dense and self.conv.groups == 1:  # reads the child
            y = y * 0.5
        return torch.relu(x + y)


def _stem_and(*blocks: nn.Module) -> nn.Module:
    return look_trained(nn.Sequential(*conv_bn(3, 8), *blocks))


def test_modules_built_alike_are_traced_once_and_get_graphs_of_their_own(traces):
    model = look_trained(nn.Sequential(*conv_bn(3, 8), InplaceBasic(8), InplaceBasic(8), InplaceBasic(8)))
    analysis = analyze(model.eval(), (torch.randn(1, 3, 16, 16),))
    assert traces == ["Sequential", "InplaceBasic"]
    graphs = [r.graph for r in analysis.records if isinstance(r.module, InplaceBasic)]
    assert len(graphs) == 3 and len({id(g) for g in graphs}) == 3
    convs = [
        next(n for n in g.nodes if n.op == "call_module" and n.target == "conv1").meta[META_KEY].ops[0].path
        for g in graphs
    ]
    assert convs == ["2.conv1", "3.conv1", "4.conv1"]  # each graph carries its own module's metadata


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(dict(scale=0.5), id="plain float attribute"),
        pytest.param(dict(scale=2.0, halve_if_dense=True), id="plain bool attribute"),
    ],
)
def test_a_different_attribute_is_a_different_structure(traces, second):
    first = ScaledBlock(8, scale=2.0)
    model = _stem_and(first, ScaledBlock(8, **second), ScaledBlock(8, scale=2.0))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    inject(model, "eca", after="residual", example_input=x[:1])  # verification compares with the eager model
    assert traces.count("ScaledBlock") == 2
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    move_off_identity(model)
    with torch.no_grad():
        assert not torch.equal(model(x), expected)


def test_a_child_attribute_the_forward_reads_is_part_of_the_structure(traces):
    """Same class, same own attributes; only the child conv's groups differ, and the forward reads them."""
    model = _stem_and(ScaledBlock(8, 1.0, True), ScaledBlock(8, 1.0, True, groups=2), ScaledBlock(8, 1.0, True))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    report = plan(model, "eca", after="residual", example_input=x[:1])
    assert traces.count("ScaledBlock") == 2 and len(report) == 3
    inject(model, "eca", after="residual", example_input=x[:1])
    with torch.no_grad():
        assert torch.equal(model(x), expected)


class TypedScale(nn.Module):
    """Traces only with ``scale`` fixed (it compares it); its graph then depends on the type too."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn(8, 8)

    def forward(self, x, scale):
        if scale > 0 and isinstance(scale, float):
            x = x * 2
        return x + self.bn(self.conv(x)) * scale


def test_arguments_fixed_at_trace_time_are_keyed_by_type_too(traces):
    """1 == 1.0 in a dict key, yet the two calls trace to different graphs."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(*conv_bn(3, 8))
            self.a, self.b = TypedScale(), TypedScale()

        def forward(self, x):
            return self.b(self.a(self.stem(x), 1), 1.0)

    model = look_trained(Net())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    inject(model, "eca", after="residual", example_input=x[:1])  # verification compares with the eager model
    assert traces.count("TypedScale") == 3  # one failure (shared), then one trace per type of scale
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_a_failed_trace_is_shared_with_modules_built_alike(traces):
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn(8, 8)
            self.act = nn.ReLU()

        def forward(self, x):
            return x + self.act(self.bn(self.conv(x))) if x.sum() > -1e9 else x  # data-dependent: fx cannot trace it

    model = _stem_and(Untraceable(), Untraceable(), Untraceable())
    report = plan(model, "eca", after="conv", example_input=torch.randn(1, 3, 16, 16))
    assert traces.count("Untraceable") == 1
    assert [path for path, _ in report.untraced] == ["2", "3", "4"] and len({r for _, r in report.untraced}) == 1
    assert [s.owner for s in report.sites] == ["", "2.act", "3.act", "4.act"]  # the stem's unit, one in each block


def test_resnet50_traces_one_graph_per_structure(traces):
    """16 bottlenecks, 8 structures (each stage's first block has a downsample and other shapes)."""
    model = timm.create_model("resnet50").eval()
    analyze(model, (torch.randn(1, 3, 64, 64),))
    assert traces.count("Bottleneck") == 8  # was 16 before the cache
    # the ResNet, 4 stages and 4 downsamples (nn.Sequential, built without fx), and the head's pool
    # (forward_head's calls are analysed too)
    assert len(traces) == 18 and traces.count("SelectAdaptivePool2d") == 1
