"""The analysis in shapes only (graph/shapes.py): the plan comes from a forward on the meta device,
no convolution computes values, the model keeps its own tensors, and a forward that needs values
is analysed on real tensors with the reason in the plan."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from attn_inject import inject, plan
from attn_inject.graph import shapes
from attn_inject.graph.analyze import analyze
from attn_inject.testing import look_trained, move_off_identity

X = torch.randn(1, 3, 224, 224)


class RealConvolutions(TorchDispatchMode):
    """Counts convolutions computed on real (not meta) tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and not args[0].is_meta:
            self.count += 1
        return func(*args, **(kwargs or {}))


def summary_without_how(p) -> dict:
    return {k: v for k, v in p.summary().items() if k not in ("shapes_only", "real_values")}


def test_resnet18_plans_in_shapes_only_the_same_sites_without_computing_a_convolution(monkeypatch):
    model = look_trained(timm.create_model("resnet18")).eval()
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    monkeypatch.setattr(shapes, "MIN_WORK", 0)  # ResNet-18 at this size is below the rule: meta forced
    with RealConvolutions() as counter:
        shaped = plan(model, "se", after="basic", example_input=X)
    assert counter.count == 0
    assert shaped.real_values is None and shaped.summary()["shapes_only"] is True
    assert {n: (p, p.data_ptr()) for n, p in model.named_parameters()} == params  # its own tensors, put back
    assert all(p.device.type == "cpu" for p in model.parameters())
    monkeypatch.setattr(shapes, "MIN_WORK", float("inf"))
    with RealConvolutions() as counter:
        real = plan(model, "se", after="basic", example_input=X)
    assert counter.count == 20 and real.real_values.startswith("the example is small")
    assert summary_without_how(shaped) == summary_without_how(real) and len(shaped) == 8


def test_inject_after_a_shapes_only_analysis_is_bitwise_and_its_blocks_are_on_the_model_device():
    model = look_trained(timm.create_model("resnet18")).eval()
    with torch.no_grad():
        before = model(X)
    inject(model, "eca", after="basic", example_input=X)
    blocks = [m for n, m in model.named_modules() if n.endswith(".se")]
    assert len(blocks) == 8 and all(p.device.type == "cpu" for b in blocks for p in b.parameters())
    with torch.no_grad():
        assert torch.equal(model(X), before)
        move_off_identity(model)
        assert not torch.equal(model(X), before)


class Gated(nn.Module):
    """A residual block whose forward branches on a value: fx cannot trace it, meta cannot run it."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        return x + y if y.mean() > -1e9 else x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Gated(8), Gated(8))

    def forward(self, x):
        return self.blocks(self.stem(x))


@pytest.fixture
def small_is_large(monkeypatch):
    monkeypatch.setattr(shapes, "MIN_WORK", 0)


def test_a_forward_that_needs_values_is_analysed_on_real_tensors_and_the_plan_says_why(small_is_large, monkeypatch):
    model = look_trained(Net())
    x = torch.randn(1, 3, 16, 16)
    p = plan(model, "se", after="conv", example_input=x)
    assert "needs values" in p.real_values and "aten." in p.real_values
    assert [s.owner for s in p.sites] == ["stem", "blocks.0.act", "blocks.1.act"]  # the stem's unit, one in each block
    monkeypatch.setattr(shapes, "MIN_WORK", float("inf"))
    assert summary_without_how(plan(model, "se", after="conv", example_input=x)) == summary_without_how(p)
    monkeypatch.setattr(shapes, "MIN_WORK", 0)
    with torch.no_grad():
        before = model(x)
    inject(model, "se", after="conv", example_input=x)
    with torch.no_grad():
        assert torch.equal(model(x), before)
        assert move_off_identity(model) == 3
        assert not torch.equal(model(x), before)


class WithTensorAttribute(nn.Module):
    """A plain tensor attribute (not a buffer) stays on the real device: the meta run cannot mix it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.scale = torch.full((1, 8, 1, 1), 0.5)

    def forward(self, x):
        x = self.conv(x)
        return x + self.body(x) * self.scale


def test_a_tensor_that_stays_real_sends_the_analysis_to_real_tensors(small_is_large):
    model = WithTensorAttribute().eval()
    x = torch.randn(1, 3, 16, 16)
    shaped, how, _ = shapes.analyze_shapes_first(model, (x,), {})
    assert how.real_values is not None and "needs values" in how.real_values
    real = analyze(model, (x,))
    assert [r.path for r in shaped.records] == [r.path for r in real.records]


class CountsCalls(nn.Module):
    """Counts its calls in a plain tensor attribute (not a buffer): a write the meta run must not make."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.calls = torch.zeros(())

    def forward(self, x):
        self.calls.add_(1)
        x = self.stem(x)
        return x + self.body(x)


def test_a_write_into_a_real_tensor_stops_the_meta_run_before_it_happens(small_is_large):
    """The meta run has no copy-on-write watch: its dispatch mode refuses the write instead, and the
    analysis runs again on real tensors, under the watch that takes the write back."""
    model = look_trained(CountsCalls())
    calls, before = model.calls, model.calls.clone()
    p = plan(model, "se", after="conv", example_input=torch.randn(1, 3, 16, 16))
    assert p.real_values == "aten.add_.Tensor writes into a tensor of the model (taken back on real tensors only)"
    assert model.calls is calls and torch.equal(calls, before)
    assert len(p) == 2


def test_a_model_that_folds_or_sits_on_the_meta_device_is_analysed_as_before(small_is_large):
    folding = timm.create_model("repvgg_a0").eval()
    assert "can fold its branches" in plan(folding, "se", after="conv", example_input=X).real_values
    with torch.device("meta"):
        on_meta = timm.create_model("resnet18")
    assert "not on one real device" in plan(on_meta, "se", after="basic", example_input=X.to("meta")).real_values


class CachesThenBranches(nn.Module):
    """Caches a tensor made from its input (as torchvision's AnchorGenerator does), then needs a value."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.cache: torch.Tensor | None = None

    def forward(self, x):
        x = self.stem(x)
        if self.cache is None:
            self.cache = torch.ones_like(x[:1, :1])
        y = x + self.body(x) * self.cache
        return y if y.sum() > -1e9 else x  # a value: the meta run stops here, after caching


def test_what_the_meta_run_cached_is_gone_before_the_real_run(small_is_large, monkeypatch):
    """Without that, the real run would multiply by a meta tensor ("Cannot copy out of meta tensor")."""
    model = look_trained(CachesThenBranches())
    x = torch.randn(1, 3, 16, 16)
    p = plan(model, "se", after="conv", example_input=x)
    assert "needs values" in p.real_values and model.cache is None
    monkeypatch.setattr(shapes, "MIN_WORK", float("inf"))
    assert summary_without_how(plan(model, "se", after="conv", example_input=x)) == summary_without_how(p)
    assert len(p) == 2  # the stem unit and the body unit


def test_the_rule_counts_conv_work_not_parameters():
    """A detector whose parameters sit in linear heads (Faster R-CNN MobileNetV3-320: 19 M parameters,
    5.1e11 conv weights x pixels) is analysed on real tensors: on meta its region proposals fail and
    a second analysis would double inject's time. ResNet-50 at 224 px (1.2e12) runs on meta."""
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    report = plan(detector.eval(), "eca", after="residual", example_input=([torch.rand(3, 320, 320)],))
    assert (
        report.real_values.startswith("the example is small (") and "conv weights x 102400 pixels" in report.real_values
    )
    resnet50 = plan(
        timm.create_model("resnet50").eval(), "eca", after="bottleneck", example_input=torch.randn(1, 3, 224, 224)
    )
    assert resnet50.real_values is None
