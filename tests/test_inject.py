"""inject / plan on small hand-written models: identity, what is kept, failures, composition."""

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

from attn_inject import AttnInjectError, inject, plan
from attn_inject.blocks import EfficientChannelAttention
from attn_inject.finetune import attention_blocks
from attn_inject.patched import PatchedForward
from tests.helpers.running import outputs
from tests.helpers.tiny_models import (
    BranchyNet,
    InplaceBasic,
    MethodAddInverted,
    TrainModeBlock,
    TwoCallNet,
    sequential_resnet,
)

X = torch.randn(4, 3, 32, 32)
EXAMPLE = torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("block", ["se", "eca"])
def test_branchy_model_untraceable_at_top_is_patched_per_block(block):
    model = BranchyNet().eval()
    before, state = outputs(model, X), {k: v.clone() for k, v in model.state_dict().items()}
    report = plan(model, block, after="residual", example_input=EXAMPLE)
    assert [(s.path, s.module_name, s.channels) for s in report] == [
        ("block1", f"block1.{block}", 16),
        ("block2", f"block2.{block}", 16),
        ("block3", f"block3.{block}", 16),
        ("block4", f"block4.{block}", 32),
    ]
    assert report.untraced == (
        ("<model>", "TraceError: symbolically traced variables cannot be used as inputs to control flow"),
    )
    patched = inject(model, block, after="residual", example_input=EXAMPLE)
    assert patched is model and type(patched) is BranchyNet
    assert torch.equal(outputs(patched, X), before)
    assert patched.answer == 42 and torch.equal(patched.features(X), patched.features(X))
    new_state = patched.state_dict()
    assert all(torch.equal(new_state[k], v) for k, v in state.items())  # every original key, same value
    assert sorted(set(new_state) - set(state)) == sorted(
        f"block{i}.{block}.{p}"
        for i in range(1, 5)
        for p in (["conv.weight"] if block == "eca" else ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"])
    )
    assert (
        sum(p.numel() for p in patched.parameters())
        - sum(v.numel() for v in state.values() if v.dtype.is_floating_point)
        + sum(v.numel() for k, v in state.items() if "running" in k)
        == report.params_added
    )
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in patched.modules())


def test_original_checkpoint_still_loads_strictly_except_new_keys():
    model = BranchyNet().eval()
    state = copy.deepcopy(model.state_dict())
    inject(model, "eca", after="residual", example_input=EXAMPLE)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == [
        f"block{i}.eca.conv.weight" for i in range(1, 5)
    ]


def test_inplace_method_add_gets_its_block_before_the_add():
    model = MethodAddInverted(8).eval()
    x = torch.randn(2, 8, 10, 10)
    before = outputs(model, x)
    inject(model, "eca", after="inverted_residual", example_input=x[:1])
    assert torch.equal(outputs(model, x), before)
    with torch.no_grad():  # the block sees the branch, not the sum: make it non-identity to check
        model.eca.conv.weight.fill_(1.0)
        branch = model.conv(x)
        expected = model.eca(branch) + x
    assert torch.equal(outputs(model, x), expected)


def test_block_goes_on_the_branch_not_the_shortcut():
    model = InplaceBasic(16, stride=2).eval()  # projection shortcut: 1 conv vs 2 on the branch
    x = torch.randn(2, 8, 16, 16)
    inject(model, "se", after="basic", example_input=x[:1])
    with torch.no_grad():
        model.se.fc2.bias.fill_(-30.0)  # gate ~ 0: the output must become relu(shortcut)
        expected = torch.relu(model.downsample(x))
    assert torch.allclose(outputs(model, x), expected, atol=1e-6)


def test_block_output_position_is_after_add_and_activation():
    model = InplaceBasic(16).eval()
    x = torch.randn(2, 16, 8, 8)
    inject(model, "se", after="basic", position="block_output", example_input=x[:1])
    assert "se_out" in dict(model.named_children())
    with torch.no_grad():
        model.se_out.fc2.bias.fill_(-30.0)
    assert outputs(model, x).abs().max() < 1e-6  # everything after the block is gated to ~0


def test_sequential_model_and_conv_units():
    model = sequential_resnet().eval()
    before = outputs(model, X)
    report = plan(model, "eca", after=["basic", "conv"], example_input=EXAMPLE)
    assert [(s.path, s.rule, s.module_name) for s in report] == [
        ("3", "basic", "3.eca"),
        ("4", "basic", "4.eca"),
        ("0", "conv", "0_eca"),
        ("3.conv1", "conv", "3.conv1_eca"),
        ("3.conv2", "conv", "3.conv2_eca"),
        ("4.conv1", "conv", "4.conv1_eca"),
        ("4.conv2", "conv", "4.conv2_eca"),
    ]
    inject(model, "eca", after=["basic", "conv"], example_input=EXAMPLE)
    assert type(model) is nn.Sequential and isinstance(model[0], nn.Conv2d) and isinstance(model[7], nn.Linear)
    assert len(model) == 9 and model[8] is model.get_submodule("0_eca")  # appended; existing indices unchanged
    assert torch.equal(outputs(model, X), before)


def test_block_called_with_and_without_a_shortcut_argument():
    model = TwoCallNet().eval()
    before = outputs(model, X)
    # b's shortcut skips a too: from the fork its branch holds a's and b's convs (residual, not basic)
    assert [(s.path, s.rule) for s in plan(model, "eca", after=["basic", "residual"], example_input=EXAMPLE)] == [
        ("a", "basic"),
        ("b", "residual"),
    ]
    inject(model, "eca", after="residual", example_input=EXAMPLE)
    assert sorted(attention_blocks(model)) == ["a.eca", "b.eca"]
    assert torch.equal(outputs(model, X), before)
    with torch.no_grad():
        model.b.eca.conv.weight.fill_(1.0)
    assert not torch.equal(outputs(model, X), before)  # the call with shortcut= runs the block too


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mode_is_restored_and_train_mode_runs_the_block(mode):
    model = TrainModeBlock(8)
    model.train(mode == "train")
    model.bn.eval()  # a mixed-mode model: each module's flag must come back as it was
    inject(model, "se", after="residual", example_input=torch.randn(1, 8, 6, 6))
    assert model.training == (mode == "train") and model.bn.training is False
    assert model.se.training == (mode == "train")
    assert isinstance(model.forward, PatchedForward) and len(model.forward.variants) == 2
    model.train()
    with torch.no_grad():
        model.se.fc2.bias.fill_(-30.0)
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(model(x), x, atol=1e-5)  # train graph: branch gated off, dropout or not


def test_gradients_at_step_zero_equal_the_original_model():
    original = BranchyNet()
    patched = copy.deepcopy(original)
    inject(patched, "se", after="residual", example_input=EXAMPLE)
    assert patched.training
    x, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for model in (original, patched):
        nn.functional.cross_entropy(model(x), target).backward()
    grads = dict(patched.named_parameters())
    for name, p in original.named_parameters():
        assert torch.equal(grads[name].grad, p.grad), name
    for name, block in attention_blocks(patched).items():
        assert block.fc2.weight.grad.abs().sum() > 0, name
        assert block.fc1.weight.grad is not None


def test_failed_verification_leaves_the_model_untouched(monkeypatch):
    model = BranchyNet().eval()
    before, keys = outputs(model, X), list(model.state_dict())
    monkeypatch.setattr(EfficientChannelAttention, "forward", lambda self, x: x * 1.5)
    with pytest.raises(
        AttnInjectError, match=r"after injecting eca into BranchyNet: output 0 differs .*the model was left unchanged"
    ):
        inject(model, "eca", after="residual", example_input=EXAMPLE)
    assert list(model.state_dict()) == keys and not attention_blocks(model)
    assert not any(isinstance(m.__dict__.get("forward"), PatchedForward) for m in model.modules())
    assert torch.equal(outputs(model, X), before)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: inject(m, "bam", after="residual"), r"unknown block 'bam'"),
        (lambda m: inject(m, "eca", after="basic_block"), r"unknown rule 'basic_block'"),
        (lambda m: inject(m, "se", after="residual", reduction=-1), r"SE needs reduction > 0"),
        (lambda m: inject(m, "eca", after="residual", rd=2), r"block 'eca' has no option 'rd'"),
        (
            lambda m: inject(m, "eca", after="residual", include="nothing.*"),
            r"rule 'residual' matched nothing in BranchyNet; the model contains: basic x2, bottleneck x1, conv x12,"
            r" inverted_residual x1, residual x4 \(before include=\['nothing\.\*'\]",
        ),
        (
            lambda m: inject(m, "eca", after="conv", position="block_output"),
            r"position 'block_output' does not apply to rule 'conv'",
        ),
        (lambda m: inject("resnet50", "eca", after="residual"), r"model must be a torch.nn.Module, not str"),
    ],
)
def test_bad_input_raises_one_clear_error_and_changes_nothing(call, message):
    model = BranchyNet().eval()
    keys = list(model.state_dict())
    with pytest.raises(AttnInjectError, match=message):
        call(model)
    assert list(model.state_dict()) == keys and not attention_blocks(model)


def test_rule_matching_nothing_names_the_rule_and_what_the_model_has():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(
        AttnInjectError,
        match=(
            r"^rule 'bottleneck', 'basic' matched nothing in Sequential; the model contains: no residual blocks or"
            r" conv units$"
        ),
    ):
        inject(model, "eca", after=["bottleneck", "basic"], example_input=EXAMPLE)


def test_injections_compose_and_names_do_not_collide():
    model = BranchyNet().eval()
    before = outputs(model, X)
    inject(model, "eca", after="residual", example_input=EXAMPLE)
    inject(model, "se", after="residual", position="block_output", example_input=EXAMPLE)
    with pytest.raises(
        AttnInjectError, match=r"^block1 already has an eca block at branch_end \(block1\.eca\).*pass stack=True"
    ):
        inject(model, "eca", after="basic", example_input=EXAMPLE)  # the same block at the same place
    assert {n for n in attention_blocks(model) if n.startswith("block1.")} == {"block1.eca", "block1.se_out"}
    inject(model, "eca", after="basic", example_input=EXAMPLE, stack=True)
    assert {n for n in attention_blocks(model) if n.startswith("block1.")} == {
        "block1.eca",
        "block1.se_out",
        "block1.eca_1",
    }
    assert torch.equal(outputs(model, X), before)
    with torch.no_grad():
        model.block1.eca.conv.weight.fill_(1.0)  # the first injection is still live
    assert not torch.equal(outputs(model, X), before)


def test_patched_model_survives_deepcopy_pickle_and_jit_trace():
    model = inject(BranchyNet().eval(), "se", after="residual", example_input=EXAMPLE)
    with torch.no_grad():
        for block in attention_blocks(model).values():
            block.fc2.bias.normal_()  # not the identity any more
    expected = outputs(model, X)
    clone = copy.deepcopy(model)
    assert clone.block1.forward.module is clone.block1
    restored = pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    traced = torch.jit.trace(model, EXAMPLE, check_trace=False)
    for other in (clone, restored, loaded):
        assert torch.equal(outputs(other, X), expected)
    assert torch.equal(outputs(traced, X[:1]), outputs(model, X[:1]))


def test_plan_is_a_dry_run():
    model = BranchyNet().eval()
    keys = list(model.state_dict())
    report = plan(model, "se", after="residual", reduction=4, example_input=EXAMPLE)
    assert list(model.state_dict()) == keys and not attention_blocks(model)
    assert report.options == (("reduction", 4),)
    assert report.params_added == sum(s.params for s in report) == 3 * (2 * 16 * 8 + 8 + 16) + (2 * 32 * 8 + 8 + 32)
    assert report.params_after == report.params_before + report.params_added
    assert (
        str(report.sites[0])
        == "block1: residual at branch end (before the add), 16 channels, +280 params, +512 FLOPs as block1.se"
    )


def shape_dependent_pad(x, multiple: int):
    """Python control flow on a shape: fx cannot trace this unless it is a leaf call."""
    if x.shape[-1] % multiple:
        x = nn.functional.pad(x, (0, multiple - x.shape[-1] % multiple, 0, multiple - x.shape[-2] % multiple))
    return x


class PaddedBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        x = shape_dependent_pad(x, 4)
        return x + self.bn(self.conv(x))


def test_timm_notrace_functions_are_honoured(monkeypatch):
    from timm.layers import _fx as timm_fx
    from timm.layers import register_notrace_function

    from attn_inject.graph import trace

    x = torch.randn(1, 8, 10, 10)
    with pytest.raises(
        AttnInjectError,
        match=(
            r"1 module\(s\) could not be traced by torch.fx \(e.g. 0: TraceError: symbolically traced variables"
            r" cannot be used as inputs to control flow\)"
        ),
    ):
        plan(nn.Sequential(PaddedBlock(8)), "eca", after="residual", example_input=x)
    monkeypatch.setattr(timm_fx, "_autowrap_functions", set(timm_fx._autowrap_functions))
    register_notrace_function(shape_dependent_pad)
    trace._timm_notrace_functions.cache_clear()
    try:
        model = nn.Sequential(PaddedBlock(8)).eval()
        before = outputs(model, x)
        inject(model, "eca", after="residual", example_input=x)
        assert list(attention_blocks(model)) == ["0.eca"] and torch.equal(outputs(model, x), before)
    finally:
        trace._timm_notrace_functions.cache_clear()


def test_list_arguments_size_tuples_and_runtime_bound_forwards_are_patched():
    from tests.helpers.tiny_models import StructuredNet

    model = StructuredNet().eval()
    before = outputs(model, X)
    inject(model, "eca", after="residual", example_input=EXAMPLE)
    assert sorted(attention_blocks(model)) == ["bound.eca", "eca", "lists.eca", "lists.eca_1", "pos.eca"]
    assert torch.equal(outputs(model, X), before)
    with torch.no_grad():
        for block in attention_blocks(model).values():
            block.conv.weight.fill_(0.5)
    changed = outputs(model, X)
    assert not torch.equal(changed, before)  # every block is live
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(outputs(restored, X), changed)
    # a size never seen at inject time runs the forward it replaced, without the block
    tokens = torch.randn(1, 20, 8)
    with torch.no_grad():
        assert torch.equal(model.pos(tokens, (4, 5)), type(model.pos).forward(model.pos, tokens, (4, 5)))


class DictNeck(nn.Module):
    """Takes an OrderedDict of feature maps (as torchvision's FPN does), a residual per level."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, feats: dict):
        names = list(feats.keys())
        return OrderedDict((name, feats[name] + self.bn(self.conv(feats[name]))) for name in names)


def test_dict_of_feature_maps_is_fixed_by_its_keys():
    neck = DictNeck(8).eval()
    feats = OrderedDict(p3=torch.randn(2, 8, 8, 8), p4=torch.randn(2, 8, 4, 4))
    with torch.no_grad():
        neck.bn.running_var.uniform_(0.5, 1.5)
        expected = neck(feats)
    report = plan(neck, "eca", after="residual", example_input=(feats,))
    assert len(report) == 2 and report.untraced == ()  # one graph for exactly these keys: an add per level
    inject(neck, "eca", after="residual", example_input=(feats,))
    with torch.no_grad():
        out = neck(feats)
        assert type(out) is OrderedDict and list(out) == ["p3", "p4"]
        assert all(torch.equal(out[k], expected[k]) for k in expected)
        neck.eca.conv.weight.fill_(0.5)
        neck.eca_1.conv.weight.fill_(0.5)
        moved = neck(feats)
        assert not torch.equal(moved["p3"], expected["p3"]) and not torch.equal(moved["p4"], expected["p4"])
        other = OrderedDict(p3=feats["p3"])  # keys never seen at inject time: the forward it replaced
        assert torch.equal(neck(other)["p3"], DictNeck.forward(neck, other)["p3"])


class CondNet(nn.Module):
    """Blocks called inside torch.cond: hooks cannot observe them there."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.block1, self.block2 = InplaceBasic(16), InplaceBasic(16)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cond(x.mean() > -1e9, lambda t: self.block1(t), lambda t: t.clone(), (x,))
        return self.block2(x).mean((2, 3))


def test_blocks_called_inside_torch_cond_are_reached_and_patched():
    """The analysis runs under attn_inject's copy-on-write dispatch mode, which runs torch.cond's
    branches eagerly: the hooks see block1, and its patch is live when cond runs compiled later."""
    torch._dynamo.reset()
    report = plan(CondNet().eval(), "se", after="basic", example_input=torch.randn(1, 3, 16, 16))
    assert [s.path for s in report] == ["block1", "block2"] and report.unreached == ()
    assert report.untraced[0][0] == "<model>"
    model = CondNet().eval()
    x = torch.randn(2, 3, 16, 16)
    before = outputs(model, x)
    inject(model, "se", after="basic", example_input=torch.randn(1, 3, 16, 16))
    assert list(attention_blocks(model)) == ["block1.se", "block2.se"] and torch.equal(outputs(model, x), before)
    with torch.no_grad():
        model.block1.se.fc2.bias.normal_()
    assert not torch.equal(outputs(model, x), before)


def test_a_model_failing_on_the_example_input_is_one_clear_error():
    with pytest.raises(
        AttnInjectError, match=r"the example forward of BranchyNet failed: RuntimeError: .*Pass example_input="
    ):
        plan(BranchyNet(), "eca", after="residual", example_input=torch.randn(1, 5, 32, 32))
