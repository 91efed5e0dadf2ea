"""Every bad argument is one AttnInjectError naming it; misleading cases get the right message."""

import itertools

import pytest
import torch
from torch import nn

from attn_inject import AttnInjectError, inject, plan
from attn_inject.blocks import list_blocks, register_block, registered_block
from tests.helpers.tiny_models import BranchyNet, InplaceBasic, conv_bn, sequential_resnet

EXAMPLE = torch.randn(1, 3, 32, 32)
OPTIONS = (
    r"Its options and defaults: \{'reduction': 16, 'rd_channels': None, 'rd_divisor': 8, 'rd_ratio': None, 'rd_of':"
    r" 'channels', 'rd_round_limit': 0\.0, 'act': 'relu', 'gate': 'sigmoid', 'block_in_channels': None,"
    r" 'spatial_dims': 2, 'init':"
    r" 'identity'\}"
)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(block="eca", after=None),
            r"^after= must be a rule name, a YAML rule file, a Rule or a list of these, not None\. Valid built-in"
            r" rules: basic, bottleneck, conv, inception, inverted_residual, inverted_residual_all, mbconv_se,"
            r" mmcv_after_conv2, mobilenetv3_se, regnet_se, residual\.$",
        ),
        (dict(block="eca", after=42), r"^after= must be .*, not 42\. "),
        (
            dict(block="eca", after="residual", include=None),
            r"^include= must be a glob on module paths or a list of globs, not None\. For example",
        ),
        (
            dict(block="eca", after="residual", exclude=[1]),
            r"^exclude= must be a glob on module paths or a list of globs, not \[1\]",
        ),
        (
            dict(block="se", after="residual", reduction="abc"),
            rf"^block 'se': option reduction='abc' must be float, not str\. {OPTIONS}\.$",
        ),
        (
            dict(block="se", after="residual", reduction=True),
            r"^block 'se': option reduction=True must be float, not bool",
        ),
        (
            dict(block="se", after="residual", reduction=float("nan")),
            r"^block 'se': option reduction=nan must be a finite number",
        ),
        (
            dict(block="se", after="residual", reduction=float("inf")),
            r"^block 'se': option reduction=inf must be a finite number",
        ),
        (
            dict(block="se", after="residual", rd_divisor=2.5),
            r"^block 'se': option rd_divisor=2\.5 must be int, not float",
        ),
        (
            dict(block="eca", after="residual", kernel_size=3.0),
            r"^ECA kernel_size must be an odd int, 'adaptive', or steps \[\[min_channels, k\], \.\.\.\]; got 3\.0",
        ),
        (dict(block="eca", after="residual", kernel_size=4), r"^ECA needs an odd kernel_size >= 1; got kernel_size=4$"),
        (
            dict(block="eca", after="residual", kernel_size=10**9 + 1),
            r"^block 'eca' with kernel_size=1000000001 would add 1,000,000,001 parameters at block1 \(16"
            r" channels\), more than 1,048,576",
        ),
        (
            dict(block="se", after="residual", reduction=1e-9),
            r"^block 'se' with reduction=1e-09 would add 528,000,000,016 parameters at block1",
        ),
        (dict(block="eca", after="residual", init="zeros"), r"^unknown init 'zeros'\. Valid inits: identity, paper\."),
        (dict(block="eca", after="residual", init=3), r"^block 'eca': option init=3 must be str, not int"),
        (
            dict(block="eca", after="residual", position=3),
            r"^position must be a string, not 3\. Valid: branch_end, block_output, unit_output, or after_convN \(N a"
            r" conv index",
        ),
        (
            dict(block=None, after="residual"),
            r"^unknown block None\. Valid blocks: cbam, coord, eca, gc, gct, ge, se, simam\.",
        ),
        (dict(block="eca", after="residual", verify="yes"), r"^verify= must be True or False, not 'yes'"),
        (dict(block="eca", after="residual", stack=1), r"^stack= must be True or False, not 1"),
    ],
)
def test_bad_arguments_are_one_clear_error_and_change_nothing(kwargs, message):
    model = BranchyNet().eval()
    keys = list(model.state_dict())
    with pytest.raises(AttnInjectError, match=message):
        inject(model, example_input=EXAMPLE, **kwargs)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize(
    "example",
    [
        torch.randn(1, 5, 32, 32),
        torch.randn(1, 3, 32, 32, dtype=torch.float64),
        [EXAMPLE],
        "an image",
    ],
)
@pytest.mark.parametrize("call", [plan, inject])
def test_a_wrong_example_input_fails_the_same_way_in_plan_and_inject(call, example):
    with pytest.raises(
        AttnInjectError,
        match=(
            r"^the example forward of BranchyNet failed: (RuntimeError|TypeError): .* Pass example_input= \(a"
            r" tensor or tuple of arguments\) that the model accepts\.$"
        ),
    ):
        call(BranchyNet().eval(), "eca", after="residual", example_input=example)


def test_register_block_checks_its_arguments_and_the_contract():
    class NoChannels(nn.Module):
        def __init__(self, width: int, init: str = "identity"):
            super().__init__()

    class NoInit(nn.Module):
        def __init__(self, channels: int):
            super().__init__()

    with pytest.raises(
        AttnInjectError, match=r"^register_block: name must be a string usable as a submodule name, not 3"
    ):
        register_block(3)
    with pytest.raises(
        AttnInjectError, match=r"^register_block\('thing'\) needs a torch\.nn\.Module subclass, not <class 'int'>"
    ):
        register_block("thing")(int)
    with pytest.raises(
        AttnInjectError,
        match=r"NoChannels breaks the block contract: its __init__ must take channels as the first argument",
    ):
        register_block("thing")(NoChannels)
    with pytest.raises(
        AttnInjectError, match=r"NoInit breaks the block contract: its __init__ must take an init option"
    ):
        register_block("thing")(NoInit)
    assert "thing" not in list_blocks()


@pytest.fixture
def passthrough_block():
    class Passthrough(nn.Module):
        """Returns its input object itself (a user's block, e.g. a placeholder)."""

        def __init__(self, channels: int, init: str = "identity"):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x

    with registered_block("passthrough", Passthrough):
        yield Passthrough


class ReluBranch(nn.Module):
    """A residual branch ending in a ReLU, whose backward needs its output unchanged."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = conv_bn(c, c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


def test_a_custom_block_returning_its_input_still_trains(passthrough_block):
    torch.manual_seed(0)
    original = nn.Sequential(*conv_bn(3, 16), nn.ReLU(), ReluBranch(16), InplaceBasic(16))
    patched = nn.Sequential(*conv_bn(3, 16), nn.ReLU(), ReluBranch(16), InplaceBasic(16))
    patched.load_state_dict(original.state_dict())
    inject(patched, "passthrough", after="residual", example_input=EXAMPLE)
    assert type(patched[3].passthrough) is passthrough_block and type(patched[4].passthrough) is passthrough_block
    x = torch.randn(2, 3, 32, 32)
    for model in (original, patched):
        model.train()
        model(x).square().mean().backward()
    for (name, a), b in zip(
        original.named_parameters(), [p for n, p in patched.named_parameters() if "passthrough" not in n]
    ):
        assert torch.equal(a.grad, b.grad), name


_CALLS = itertools.count()


class Jittery(nn.Module):
    """Not deterministic: the output depends on a global call count (fx bakes one value in)."""

    def __init__(self):
        super().__init__()
        self.body = sequential_resnet()

    def forward(self, x):
        return self.body(x) + float(next(_CALLS))


def test_a_verify_mismatch_from_a_nondeterministic_model_says_so():
    with pytest.raises(
        AttnInjectError,
        match=(
            r"output 0 differs .*the model was left unchanged\. The original model itself gives different outputs"
            r" on the same input .*pass verify=False"
        ),
    ) as info:
        inject(Jittery().eval(), "eca", after="basic", example_input=EXAMPLE)
    assert "bug in attn_inject" not in str(info.value)


def test_quantized_models_are_told_they_are_unsupported():
    model = torch.ao.quantization.quantize_dynamic(sequential_resnet().eval(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(
        AttnInjectError,
        match=r"^quantized models are not supported \(7 is Linear\)\. Inject into the float model, then quantize it",
    ):
        plan(model, "eca", after="basic", example_input=EXAMPLE)


def test_meta_device_models_plan_and_inject_without_verify():
    with torch.device("meta"):
        model = sequential_resnet().eval()
    assert [s.path for s in plan(model, "eca", after="basic")] == ["3", "4"]
    with pytest.raises(
        AttnInjectError,
        match=(
            r"^Sequential is on the meta device: it has no values to verify the patched outputs against\. plan\(\)"
            r" works on it; inject\(\.\.\., verify=False\)"
        ),
    ):
        inject(model, "eca", after="basic")
    inject(model, "eca", after="basic", verify=False)
    assert model[3].eca.conv.weight.is_meta
    model.to_empty(device="cpu")
    assert model(EXAMPLE).shape == (1, 10)
