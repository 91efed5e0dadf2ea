"""A meta run that needs values part-way (graph/call_trail.py, graph/replay.py): with a reference
forward to run anyway (inject with verification), the calls the meta run completed before it needed
values keep their records and take their outputs from the reference forward; only the rest is
analysed again on real tensors. The plan is the one a whole analysis on real tensors makes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from attn_inject import inject, plan
from attn_inject.graph import replay, shapes
from attn_inject.graph.analyze import Analysis, analyze
from attn_inject.graph.example import run
from attn_inject.graph.nodes import META_KEY
from attn_inject.matching.plan import build_plan
from attn_inject.rules import resolve_rules
from attn_inject.testing import look_trained, move_off_identity


class ConvCalls(TorchDispatchMode):
    """Counts 2-D convolutions computed on real tensors, by weight shape (each conv here has its own;
    ECA's are 1-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[tuple[int, ...], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and not args[0].is_meta and args[1].ndim == 4:
            key = tuple(args[1].shape)
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


class Basic(nn.Module):
    def __init__(self, c: int, k: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Basic(8, 3), Basic(8, 5))

    def forward(self, x):
        return self.blocks(self.stem(x))


class Head(nn.Module):
    """A residual block, then a selection by value (``nonzero``: the meta device cannot run it)."""

    def __init__(self):
        super().__init__()
        self.block = Basic(8, 7)

    def forward(self, f):
        y = self.block(f)
        keep = torch.nonzero(y.mean((2, 3))[:, 0] > -1e9)[:, 0]
        return y[keep]


class Detector(nn.Module):
    def __init__(self, touch: bool = False):
        super().__init__()
        self.backbone = Backbone()
        self.head = Head()
        self.touch = touch  # write into the backbone's output after it returned

    def forward(self, x):
        f = self.backbone(x)
        if self.touch:
            f.mul_(1.0)
        return self.head(f)


STEM, FIRST, SECOND, HEAD = (8, 3, 3, 3), (8, 8, 3, 3), (8, 8, 5, 5), (8, 8, 7, 7)
X = torch.randn(2, 3, 16, 16)


@pytest.fixture(autouse=True)
def small_is_large(monkeypatch):
    monkeypatch.setattr(shapes, "MIN_WORK", 0)


def _detector(touch: bool = False) -> Detector:
    return look_trained(Detector(touch)).eval()


def _reference(model: nn.Module):
    return lambda: run(model, (X,))


def _facts(analysis: Analysis) -> list:
    return [
        (r.path, r.method, r.reason, [(n.name, n.meta.get(META_KEY)) for n in r.graph.nodes] if r.graph else None)
        for r in analysis.records
    ]


def test_only_what_needs_values_runs_again_and_the_analysis_is_the_real_one(monkeypatch):
    model = _detector()
    with ConvCalls() as calls:
        replayed, how, expected = shapes.analyze_shapes_first(model, (X,), {}, _reference(model))
    # the reference forward computed every conv once; the re-run none: their outputs were kept
    assert calls.counts == {STEM: 1, FIRST: 2, SECOND: 2, HEAD: 2}
    assert how.real_values.startswith("aten.nonzero.default needs values")
    assert how.real_values.endswith("on meta, outputs from the reference forward: backbone, head.block")
    with torch.no_grad():
        assert torch.equal(expected, model(X))
    monkeypatch.setattr(shapes, "MIN_WORK", float("inf"))
    real, real_how, _ = shapes.analyze_shapes_first(model, (X,), {})
    assert real_how.real_values.startswith("the example is small")
    assert _facts(replayed) == _facts(real)
    assert replayed.called == real.called
    rules = resolve_rules("residual")
    same = [build_plan(a, "eca", {}, rules, (), (), False).summary() for a in (replayed, real)]
    assert same[0] == same[1] and len(same[0]["sites"]) == 3


def test_inject_runs_each_convolution_twice_and_is_bitwise():
    model = _detector()
    with torch.no_grad():
        before = model(X)
    with ConvCalls() as calls:
        inject(model, "eca", after="residual", example_input=X)
    assert calls.counts == {STEM: 2, FIRST: 4, SECOND: 4, HEAD: 4}  # the reference and the verification
    with torch.no_grad():
        assert torch.equal(model(X), before)
        assert move_off_identity(model) == 3
        assert not torch.equal(model(X), before)


def test_an_output_written_into_after_it_was_kept_is_computed_again():
    model = _detector(touch=True)
    with ConvCalls() as calls:
        _, how, _ = shapes.analyze_shapes_first(model, (X,), {}, _reference(model))
    assert calls.counts == {STEM: 2, FIRST: 4, SECOND: 4, HEAD: 2}  # the backbone ran again; the head's block did not
    assert how.real_values.endswith("on meta, outputs from the reference forward: head.block")


def test_plan_has_no_reference_forward_so_it_analyses_everything_on_real_tensors():
    model = _detector()
    with ConvCalls() as calls:
        p = plan(model, "eca", after="residual", example_input=X)
    assert calls.counts == {STEM: 1, FIRST: 2, SECOND: 2, HEAD: 2}
    assert "needs values" in p.real_values and "reference forward" not in p.real_values
    assert len(p) == 3


def test_a_torchvision_detector_keeps_its_backbone_and_is_patched_bitwise():
    detector = look_trained(
        torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    ).eval()
    images = ([torch.rand(3, 320, 320)],)
    _, how, _ = shapes.analyze_shapes_first(detector, images, {}, lambda: run(detector, images))
    assert "aten.nonzero" in how.real_values
    assert "on meta, outputs from the reference forward: backbone" in how.real_values
    with torch.no_grad():
        before = detector(*images)
    inject(detector, "eca", after="inverted_residual", example_input=images)
    with torch.no_grad():
        after = detector(*images)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, after) for k in a)


class Select(nn.Module):
    """Keeps the samples whose mean is above a threshold: a selection by value, no parameters."""

    def forward(self, f):
        return f[torch.nonzero(f.mean((1, 2, 3)) > -1e9)[:, 0]]


class SelectsThenBlock(nn.Module):
    """A block needing values, then one that does not: a selection with a residual block inside."""

    def __init__(self):
        super().__init__()
        self.block = Basic(8, 9)
        self.select = Select()

    def forward(self, f):
        return self.select(self.block(f))


class Tail(nn.Module):
    """The backbone, a selection by value, then more blocks: one plain, one that selects again."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.select = Select()
        self.tail = Basic(8, 7)
        self.again = SelectsThenBlock()

    def forward(self, x):
        return self.again(self.tail(self.select(self.backbone(x))))


LAST = (8, 8, 9, 9)


def test_calls_after_the_one_needing_values_are_analysed_on_meta_with_outputs_kept():
    """The backbone (done before the selection) and the plain block after it are computed once, by
    the reference forward; the block inside the second selection too: that selection needs values,
    so it is analysed on real tensors, and its block on meta."""
    model = look_trained(Tail()).eval()
    with ConvCalls() as calls:
        replayed, how, expected = shapes.analyze_shapes_first(model, (X,), {}, _reference(model))
    assert calls.counts == {STEM: 1, FIRST: 2, SECOND: 2, HEAD: 2, LAST: 2}  # the reference forward only
    assert how.real_values.endswith("on meta, outputs from the reference forward: backbone, tail, again.block")
    real = analyze(model, (X,))
    assert _facts(replayed) == _facts(real)
    with torch.no_grad():
        before = model(X)
    assert torch.equal(expected, before)
    with ConvCalls() as calls:
        inject(model, "eca", after="residual", example_input=X)
    assert calls.counts == {STEM: 2, FIRST: 4, SECOND: 4, HEAD: 4, LAST: 4}
    with torch.no_grad():
        assert torch.equal(model(X), before)
        assert move_off_identity(model) == 4
        assert not torch.equal(model(X), before)


def test_outputs_beyond_the_budget_are_computed(monkeypatch):
    """The budget is the model's size (here, MIN_BUDGET lowered to nothing): the maps of a 64 px
    example are larger than this small model, so nothing after the selection is kept."""
    monkeypatch.setattr(replay, "MIN_BUDGET", 0)
    model = look_trained(Tail()).eval()
    x = torch.randn(2, 3, 64, 64)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size < 2 * 8 * 64 * 64 * 4  # one map of the tail's output
    with ConvCalls() as calls:
        _, how, _ = shapes.analyze_shapes_first(model, (x,), {}, lambda: run(model, (x,)))
    assert calls.counts == {STEM: 1, FIRST: 2, SECOND: 2, HEAD: 4, LAST: 4}
    assert how.real_values.endswith("on meta, outputs from the reference forward: backbone")


class Extends(nn.Module):
    """Extends a list of names it is given, as torchvision's LastLevelP6P7 does: its traced graph fails
    on the example (on real tensors as on meta), so it runs as it is."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, maps, names):
        names.extend(["extra"])
        return self.conv(maps[-1])


class WithExtra(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Backbone()
        self.extra = Extends()

    def forward(self, x):
        f = self.body(x)
        return f + self.extra([f], ["body"])


class ExtraThenSelect(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = WithExtra()
        self.head = Head()

    def forward(self, x):
        return self.head(self.backbone(x))


def test_a_call_whose_graph_failed_is_not_kept_but_the_calls_inside_it_are():
    """The meta run's record of ``backbone`` holds a graph that failed (it might have needed values):
    the backbone is analysed again, its body (which stands) taken from the reference forward."""
    model = look_trained(ExtraThenSelect()).eval()
    with ConvCalls() as calls:
        replayed, how, _ = shapes.analyze_shapes_first(model, (X,), {}, _reference(model))
    assert how.real_values.endswith("on meta, outputs from the reference forward: backbone.body, head.block")
    assert calls.counts == {STEM: 1, FIRST: 2, SECOND: 2, HEAD: 2, (8, 8, 1, 1): 2}
    (extra,) = [r for r in replayed.records if r.path == "backbone.extra"]
    assert extra.reason.startswith("traced, but its graph failed on the example: AttributeError")
    assert _facts(replayed) == _facts(analyze(model, (X,)))


def test_inject_logs_what_ran_on_real_tensors(caplog):
    model = _detector()
    with caplog.at_level("INFO", logger="attn_inject.surgery.api"):
        inject(model, "eca", after="residual", example_input=X)
    (message,) = [r.getMessage() for r in caplog.records if "analysed on real tensors" in r.getMessage()]
    assert message.startswith("Detector was analysed on real tensors: aten.nonzero.default needs values")
    assert message.endswith("on meta, outputs from the reference forward: backbone, head.block")


def test_the_meta_run_stops_at_the_first_op_that_needs_values():
    """Its result is discarded then: the head's graph is not retried eagerly on meta, nor the model's
    (each module of the model is called once on the meta device; before, the stem three times)."""
    model = _detector()
    meta_calls = {"backbone.stem": 0, "head.block.conv1": 0}
    for name in meta_calls:
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: meta_calls.__setitem__(name, meta_calls[name] + args[0].is_meta)
        )
    _, how, _ = shapes.analyze_shapes_first(model, (X,), {})
    assert meta_calls == {"backbone.stem": 1, "head.block.conv1": 1}
    assert how.real_values.startswith("aten.nonzero.default needs values (NotImplementedError: ")
