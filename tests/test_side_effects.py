"""A patched forward does everything the original did; plan and failed injects leave no trace."""

import random

import pytest
import torch
from torch import nn

from attn_inject import AttnInjectError, inject, plan
from attn_inject.blocks import EfficientChannelAttention, registered_block
from attn_inject.graph import shapes
from attn_inject.graph.preserve import _CopyOnWrite, preserved
from attn_inject.surgery import api as surgery_api
from attn_inject.testing import look_trained
from tests.helpers.tiny_models import BranchyNet, conv_bn

X = torch.randn(1, 3, 16, 16)


class CountingBlock(nn.Module):
    """A residual block with effects fx records: a buffer counter (``add_`` or ``+=``), an unused
    child call, a draw."""

    def __init__(self, c: int, spelling: str = "add_"):
        super().__init__()
        self.spelling = spelling
        self.conv1, self.bn1 = conv_bn(c, c)
        self.conv2, self.bn2 = conv_bn(c, c)
        self.probe = nn.Conv2d(c, c, 1)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.spelling == "add_":
            self.seen.add_(1)
        else:
            self.seen += 1  # fx records seen + 1 and a rebinding: kept as the in-place update it is
        self.probe(x)  # result unused: the call must still happen (hooks, counters)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        y = y * (1 + torch.rand_like(y) * 0)  # a draw from the global generator, in the graph
        return x + y


class PythonEffects(nn.Module):
    """Effects fx cannot record: a Python counter, a list append, a draw made once at trace time."""

    def __init__(self, c: int, effect: str):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c, c)
        self.effect, self.calls, self.log = effect, 0, []

    def forward(self, x):
        if self.effect == "counter":
            self.calls += 1
        elif self.effect == "append":
            self.log.append(1)
        else:
            x = x + torch.rand(1) * 0
        return x + self.bn1(self.conv1(x))


class Net(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.block = block

    def forward(self, x):
        return self.block(self.stem(x)).mean((2, 3))


def state(model: nn.Module) -> dict:
    """Everything plan/inject must leave alone: tensors, module attributes, RNG states."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "dicts": [
            {k: (v, list(v) if isinstance(v, list) else None) for k, v in m.__dict__.items()} for m in model.modules()
        ],
        "rng": (torch.get_rng_state(), random.getstate()),
    }


def assert_same_state(before: dict, model: nn.Module) -> None:
    after = state(model)
    assert before["tensors"].keys() == after["tensors"].keys()
    assert all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    assert len(before["dicts"]) == len(after["dicts"])
    for b, a in zip(before["dicts"], after["dicts"]):
        assert b.keys() == a.keys()
        assert all(b[k][0] is a[k][0] and b[k][1] == a[k][1] for k in b)
    assert torch.equal(before["rng"][0], after["rng"][0]) and before["rng"][1] == after["rng"][1]


@pytest.mark.parametrize("spelling", ["add_", "+="])
def test_a_patched_forward_keeps_buffer_updates_unused_calls_and_draws_in_order(spelling):
    original, patched = look_trained(Net(CountingBlock(8, spelling))), look_trained(Net(CountingBlock(8, spelling)))
    patched.load_state_dict(original.state_dict())
    inject(patched, "eca", after="residual", example_input=X)
    assert next(iter(patched.block.forward.variants.values())).fn is not None
    probed = []
    patched.block.probe.register_forward_hook(lambda *a: probed.append(1))
    for _ in range(3):
        torch.manual_seed(1)
        expected = original(X)
        torch.manual_seed(1)
        assert torch.equal(patched(X), expected)
    assert original.block.seen.item() == patched.block.seen.item() == 3  # inject itself counted nothing
    assert "seen" in patched.block._buffers and "seen" not in patched.block.__dict__
    assert probed == [1, 1, 1]
    torch.manual_seed(1)
    original(X)
    after_original = torch.get_rng_state()
    torch.manual_seed(1)
    patched(X)
    assert torch.equal(torch.get_rng_state(), after_original)  # the same draws
    with torch.no_grad():
        patched.block.eca.conv.weight.fill_(1.0)
    assert not torch.equal(patched(X), original(X))


@pytest.mark.parametrize(
    "effect,reason",
    [
        ("counter", "sets attribute 'calls'"),
        ("append", "changes the contents of attribute 'log'"),
        ("draw", "draws random numbers fx runs once at trace time"),
    ],
)
def test_a_forward_with_effects_fx_cannot_record_is_left_unpatched_and_named(effect, reason):
    model = look_trained(Net(PythonEffects(8, effect)))
    before = state(model)
    with pytest.raises(
        AttnInjectError,
        match=(
            rf"matched nothing in Net.*could not be traced by torch.fx \(e\.g\. block: its forward {reason}, which"
            rf" a traced graph would not repeat\)"
        ),
    ):
        inject(model, "eca", after="residual", example_input=X)
    assert_same_state(before, model)


@pytest.fixture(params=["real", "meta"])
def analysis(request, monkeypatch):
    """The analysis on real tensors (the forwards under the copy-on-write watch), or on the meta
    device (the forwards with what it saw written copied up front, no watch)."""
    monkeypatch.setattr(shapes, "MIN_WORK", float("inf") if request.param == "real" else 0)
    return request.param


def test_plan_is_exactly_a_dry_run(analysis):
    model = look_trained(Net(CountingBlock(8)))
    model.train()
    random.seed(3)
    before = state(model)
    report = plan(model, "se", after="residual", example_input=X)
    assert [s.path for s in report] == ["block"]
    assert_same_state(before, model)
    assert model.block.seen.item() == 0 and model.training


def test_a_successful_inject_leaves_the_original_state_and_rng_as_they_were(analysis):
    model = look_trained(Net(CountingBlock(8)))
    before = state(model)
    inject(model, "eca", after="residual", example_input=X)
    tensors = {k: v for k, v in model.state_dict().items() if ".eca." not in k}
    assert tensors.keys() == before["tensors"].keys()
    assert all(torch.equal(before["tensors"][k], tensors[k]) for k in tensors)
    assert model.block.seen.item() == 0
    after = torch.get_rng_state()  # building the block draws its default init (as any new module); nothing else
    torch.set_rng_state(before["rng"][0])
    EfficientChannelAttention(8)
    assert torch.equal(torch.get_rng_state(), after)


def test_a_failed_inject_leaves_every_value_attribute_and_rng_state(monkeypatch, analysis):
    model = look_trained(Net(CountingBlock(8)))
    before = state(model)
    monkeypatch.setattr(EfficientChannelAttention, "forward", lambda self, x: x * 1.5)
    with pytest.raises(
        AttnInjectError, match=r"Block block\.eca \(EfficientChannelAttention\) does not return its input unchanged"
    ):
        inject(model, "eca", after="residual", example_input=X)
    assert_same_state(before, model)


class Raises(nn.Module):
    """A user's block that raises on real values (a bug its shape-only cost estimate does not see)."""

    def __init__(self, channels: int, init: str = "identity"):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        if x.is_meta:
            return x
        raise RuntimeError("boom")


class ToDouble(Raises):
    """A user's block that returns its input in float64: the next conv (float32 weights) fails."""

    def forward(self, x):
        return x.double()


class AlwaysRaises(Raises):
    def forward(self, x):
        raise RuntimeError("boom")


def counting_net() -> nn.Module:
    return Net(CountingBlock(8))


def counting_net_then_conv() -> nn.Module:
    return Net(nn.Sequential(CountingBlock(8), nn.Conv2d(8, 4, 1)))


@pytest.mark.parametrize(
    "cls,net,why",
    [
        (
            Raises,
            counting_net,
            r"after injecting bad into Net: the patched model's forward failed \(RuntimeError: boom\); the model was"
            r" left unchanged\. Block block\.bad \(Raises\) raises RuntimeError: boom on a float32 \[1, 8, 16, 16\]"
            r" map",
        ),
        (  # the float64 map reaches the model's output
            ToDouble,
            counting_net,
            r"after injecting bad into Net: output 0 changed type or shape; the model was left unchanged\. Block"
            r" block\.bad \(ToDouble\) returns a float64 \[1, 8, 16, 16\] map for a float32 \[1, 8, 16, 16\] one",
        ),
        (  # the float64 map reaches a float32 conv, which raises
            ToDouble,
            counting_net_then_conv,
            r"after injecting bad into Net: the patched model's forward failed \(RuntimeError: .*\); the model was"
            r" left unchanged\. Block block\.0\.bad \(ToDouble\) returns a float64 \[1, 8, 16, 16\] map",
        ),
        (  # found before anything changes: the block fails on meta shapes too
            AlwaysRaises,
            counting_net,
            r"block: rule 'residual': block 'bad' fails when built and run on a 8x16x16 map \(RuntimeError: boom\)"
            r"\. Check the block's code",
        ),
    ],
)
def test_a_registered_block_that_raises_or_changes_dtype_leaves_the_model_untouched(cls, net, why):
    model = look_trained(net())
    before = state(model)
    with registered_block("bad", cls), pytest.raises(AttnInjectError, match=why):
        inject(model, "bad", after="residual", example_input=X)
    assert_same_state(before, model)
    assert not any(isinstance(m, Raises) for m in model.modules())


def test_preserved_copies_only_what_is_written():
    model = look_trained(BranchyNet())
    weight, mean = model.stem[0].weight.clone(), model.stem[1].running_mean.clone()
    with preserved(model):
        with torch.no_grad():
            model.stem[0].weight.mul_(2)
            model.stem[1].running_mean[0] = 7.0  # a write through a view
        model.answer = 0
        model.extra = 1
        model.stem.train()
        copies = torch.utils._python_dispatch._get_current_dispatch_mode()
        assert len(copies.saved) == 2  # of the model's 40 tensors, the two written
    assert torch.equal(model.stem[0].weight, weight) and torch.equal(model.stem[1].running_mean, mean)
    assert model.answer == 42 and not hasattr(model, "extra") and not model.stem.training


class WritesItsParameter(nn.Module):
    """Writes into a parameter through ``.data`` and into a buffer in eval mode."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.body = nn.Sequential(*conv_bn(8, 8))
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.scale.data.add_(0.5)  # a write through another tensor of the same storage
        self.calls += 1
        x = self.stem(x)
        return x + self.body(x) * self.scale


def test_what_the_analysis_saw_written_is_copied_up_front_and_the_forwards_run_unwatched(monkeypatch, analysis):
    """The analysis sees every write of the forward (on the meta device, or under the copy-on-write
    watch on real tensors); the reference and verification forwards then copy those tensors (and
    every buffer) up front and run without the watch, and take the writes back all the same."""
    model = look_trained(WritesItsParameter())
    _, how, _ = shapes.analyze_shapes_first(model, (X,), {})
    assert how.shapes_only == (analysis == "meta")
    assert {id(t) for t in how.writes} == {id(model.scale), id(model.calls)}
    watched, dispatch = [], _CopyOnWrite.__torch_dispatch__
    monkeypatch.setattr(_CopyOnWrite, "__torch_dispatch__", lambda *a, **k: watched.append(1) or dispatch(*a, **k))
    forwards, run = [], surgery_api.run

    def counted_run(*args, **kwargs):  # the reference and the verification forward
        start = len(watched)
        out = run(*args, **kwargs)
        forwards.append(len(watched) - start)
        return out

    monkeypatch.setattr(surgery_api, "run", counted_run)
    before = state(model)
    with torch.no_grad():
        expected = model(X)
    for tensor in (model.scale, model.calls):
        tensor.data.copy_(before["tensors"]["scale" if tensor is model.scale else "calls"])
    inject(model, "eca", after="residual", example_input=X)
    assert forwards == [0, 0]  # no op of either forward went through the copy-on-write mode
    tensors = model.state_dict()
    assert [k for k in tensors if k not in before["tensors"]] == ["eca.conv.weight"]
    assert all(torch.equal(v, tensors[k]) for k, v in before["tensors"].items())  # written twice, taken back
    with torch.no_grad():
        assert torch.equal(model(X), expected)


def test_a_lazy_model_is_refused_before_it_is_run():
    model = nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with pytest.raises(
        AttnInjectError,
        match=r"^Sequential has lazy modules whose parameters are not initialised yet \(0\)\. Run one forward",
    ):
        plan(model, "eca", after="conv", example_input=X)
    assert type(model[0]) is nn.LazyConv2d and model[0].has_uninitialized_params()
    model(X)
    assert [s.path for s in plan(model, "eca", after="conv", example_input=X)] == ["0"]


def test_a_model_holding_inference_tensors_is_planned_and_patched(analysis):
    """Inference tensors have no version counter; ``preserved`` copies them back as it would any."""
    model = look_trained(BranchyNet()).eval()
    with torch.inference_mode():
        model.stem[1].running_mean = model.stem[1].running_mean.clone()
    assert model.stem[1].running_mean.is_inference()
    with torch.no_grad():
        before = model(X)
    assert len(plan(model, "eca", after="residual", example_input=X)) == 4
    inject(model, "eca", after="residual", example_input=X)
    with torch.no_grad():
        assert torch.equal(model(X), before)
