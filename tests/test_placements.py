"""Placements the papers use: positions inside a branch, whole blocks with or without a skip,
block options from the site, and hand-written attention nets rebuilt exactly by injection."""

import copy
import io

import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from attn_inject import AttnInjectError, inject, plan
from attn_inject.blocks import EfficientChannelAttention, SqueezeExcite, eca_kernel_size, spec_of
from attn_inject.cli.console import plan_table
from attn_inject.finetune import attention_blocks
from attn_inject.graph.analyze import analyze
from attn_inject.matching.plan import build_plan
from attn_inject.rules import resolve_rules
from attn_inject.testing import look_trained
from benchmarks.reconstruct import CASES, attention_keys, load_by_order, rebuild
from tests.helpers.tiny_models import TorchAddBottleneck

X = torch.randn(2, 3, 96, 96)
SMALL = torch.randn(1, 3, 64, 64)  # example input for plans: the analysis cost grows with the image

QUICK = {"timm:regnety_002", "timm:mobilenetv3_large_100"}  # the rest: -m slow


def planner(model, example=None):
    """plan() over one shared analysis of ``model`` (the example forward dominates plan's cost)."""
    with torch.no_grad():
        analysis = analyze(model.eval(), (SMALL if example is None else example,))

    def make(block, after, position=None, **options):
        rules = [r.with_position(position) if position else r for r in resolve_rules(after)]
        return build_plan(analysis, block, options, rules)

    return make


@pytest.fixture(scope="module")
def mobilenet_v2_plan():
    return planner(torchvision.models.mobilenet_v2())


@pytest.mark.parametrize(
    "case",
    [c if c.name in QUICK else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
    ids=[c.name for c in CASES],
)
def test_injection_rebuilds_the_hand_written_model(case):
    hand, plain, patched = rebuild(case, "paper")
    assert len(attention_blocks(patched)) == case.sites
    pairs = load_by_order(patched, plain, hand)
    assert len(pairs) == len(attention_keys(hand, plain)) > 0
    with torch.no_grad():
        expected, got, without = hand(X), patched(X), plain(X)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(without, expected, rtol=1e-3, atol=1e-3)  # the attention matters

    # the default init leaves the attention-free model bit for bit as it was
    identity = inject(
        copy.deepcopy(plain), case.block, after=case.rule, include=case.include(hand), example_input=SMALL
    )
    with torch.no_grad():
        assert torch.equal(identity(X), without)
        last = list(attention_blocks(identity).values())[-1]
        dict(last.named_parameters())[spec_of(last).gate_parameters(last)[0]].fill_(0.5)
        assert not torch.equal(identity(X), without)


def test_eca_mobilenet_v2_as_published(mobilenet_v2_plan):
    model = look_trained(torchvision.models.mobilenet_v2())
    before = model(X).detach()
    authors = mobilenet_v2_plan("eca", "inverted_residual_all")
    paths = [f"features.{i}" for i in range(1, 18)]
    channels = [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
    skip = [False, False, True, False, True, True, False, True, True, True, False, True, True, False, True, True, False]
    assert [s.path for s in authors] == paths and [s.channels for s in authors] == channels
    assert [s.where for s in authors] == ["branch end (before the add)" if k else "block output (no add)" for k in skip]
    assert [s.module_name for s in authors] == [f"{p}.eca" for p in paths]
    assert [s.params for s in authors] == [1] * 10 + [3] * 7  # k = 1 below 96 channels, 3 from 96 up
    table = Console(file=io.StringIO(), width=200)
    table.print(plan_table(authors))
    assert table.file.getvalue().count("branch end (before the add)") == 10
    adaptive = mobilenet_v2_plan("eca", "inverted_residual_all", kernel_size="adaptive")
    assert [s.params for s in adaptive] == [eca_kernel_size(c) for c in channels] == [3] * 13 + [5] * 4

    inject(model, "eca", after="inverted_residual_all", example_input=SMALL)
    ks = [m.conv.kernel_size[0] for m in attention_blocks(model).values()]
    assert ks == [1] * 10 + [3] * 7
    with torch.no_grad():
        assert torch.equal(model(X), before)
        # after the projection's norm, before the add: the block gates the branch, not the sum
        block = model.features[3]
        block.eca.conv.weight.fill_(0.3)
        x = torch.randn(2, 24, 24, 24)
        assert torch.allclose(block(x), x + block.eca(block.conv(x)))
        assert not torch.allclose(block(x), block.eca(x + block.conv(x)))
        assert not torch.equal(model(X), before)


def test_block_rule_by_class_and_skip(tmp_path, mobilenet_v2_plan):
    rule = tmp_path / "ir.yaml"
    counts = {}
    for residual in ("any", "true", "false"):
        rule.write_text(
            f"name: ir\nmatch: {{kind: block, class: 'InvertedRes*', residual: {residual}}}\ninsert: block_output\n"
        )
        counts[residual] = len(mobilenet_v2_plan("eca", str(rule)))
    assert counts == {"any": 17, "true": 10, "false": 7}
    rule.write_text("name: ir\nmatch: {kind: block, class: 'Nothing*'}\n")
    with pytest.raises(AttnInjectError, match=r"rule 'ir' matched nothing in MobileNetV2"):
        mobilenet_v2_plan("eca", str(rule))


def test_after_conv_positions_inside_a_bottleneck():
    model = look_trained(ResNet(Bottleneck, [1, 1, 1, 1]))  # ResNet-50's block, one per stage
    make = planner(model)
    before = model(X).detach()
    conv2 = make("se", "mmcv_after_conv2")
    assert len(conv2) == 4 and {s.where for s in conv2} == {"after conv2 unit"}
    assert conv2.sites[0].path == "layer1.0" and conv2.sites[0].channels == 64
    assert str(conv2.sites[0]).startswith("layer1.0: mmcv_after_conv2 at after conv2 unit, 64 channels")
    last = make("se", "bottleneck", "after_conv-1")
    assert [s.position for s in last] == ["after_conv3"] * 4 and [s.channels for s in last] == [256, 512, 1024, 2048]
    first = make("se", "bottleneck", "after_conv1")
    assert [s.channels for s in first] == [64, 128, 256, 512]
    with pytest.raises(
        AttnInjectError,
        match=(
            r"rule 'bottleneck': layer1\.0 \(Bottleneck\) has 3 conv\(s\) on its residual branch, so after_conv4"
            r" does not exist"
        ),
    ):
        make("se", "bottleneck", "after_conv4")
    with pytest.raises(AttnInjectError, match=r"after_conv-4 does not exist"):
        make("se", "bottleneck", "after_conv-4")
    with pytest.raises(AttnInjectError, match=r"position 'after_conv0' does not apply to rule 'conv' \(kind unit\)"):
        make("se", "conv", "after_conv0")

    inject(model, "se", after="mmcv_after_conv2", example_input=SMALL)
    blocks = list(attention_blocks(model).items())
    assert blocks[0][0] == "layer1.0.conv2_se"  # owned by the module whose graph holds the unit
    with torch.no_grad():
        assert torch.equal(model(X), before)
        # the block gates conv2 -> bn2 -> relu, before conv3
        b = model.layer1[0]
        b.conv2_se.fc2.bias.fill_(-1.0)
        x = torch.randn(2, 64, 24, 24)
        mid = b.conv2_se(b.relu(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))))
        assert torch.allclose(b(x), b.relu(b.bn3(b.conv3(mid)) + b.downsample(x)))
        assert not torch.equal(model(X), before)


def test_a_unit_inside_a_child_module_gets_the_block_in_that_child():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), TorchAddBottleneck(16, 8)).eval()
    wrapped = torchvision.models.mobilenet_v2().features[3]  # convs inside Conv2dNormActivation children
    report = plan(
        wrapped, "eca", after="inverted_residual", position="after_conv2", example_input=torch.randn(1, 24, 16, 16)
    )
    assert [(s.owner, s.name, s.channels, s.where) for s in report] == [("conv.1", "0_eca", 144, "after conv2 unit")]
    report = plan(model, "eca", after="bottleneck", position="after_conv-2", example_input=torch.randn(1, 3, 32, 32))
    assert [(s.path, s.owner, s.channels, s.where) for s in report] == [("1", "1", 8, "after conv2 unit")]


def test_se_options_from_the_site(mobilenet_v2_plan):
    report = mobilenet_v2_plan(
        "se", "inverted_residual_all", "after_conv-2", rd_ratio=0.25, rd_of="input", rd_divisor=1
    )
    site = report.sites[1]  # features.2: 16 -> 96 expand, depthwise at 96
    assert (site.channels, dict(site.options)["block_in_channels"]) == (96, 16)
    assert site.params == 2 * 96 * 4 + 4 + 96  # reduced width 16 / 4
    own = mobilenet_v2_plan("se", "inverted_residual_all", "after_conv-2", rd_ratio=0.25)
    assert own.sites[1].params == 2 * 96 * 24 + 24 + 96  # 96 / 4


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
def test_se_act_and_gate_options_keep_identity_init_exact(act, gate):
    se = SqueezeExcite(64, act=act, gate=gate).eval()
    x = torch.randn(3, 64, 5, 5) * 10
    assert type(se.act) is {"relu": nn.ReLU, "silu": nn.SiLU}[act]
    assert torch.equal(se(x), x)
    assert torch.equal(se.gate(torch.zeros(1)) * se.gain, torch.ones(1))
    with torch.no_grad():
        se.fc2.bias.fill_(-1.0)
    assert not torch.equal(se(x), x)
    paper = SqueezeExcite(64, act=act, gate=gate, init="paper")
    z = torch.linspace(-4, 4, 9)
    assert torch.equal(paper.gate(z), torch.sigmoid(z) if gate == "sigmoid" else nn.functional.relu6(z + 3) / 6)


def test_se_and_eca_option_errors():
    with pytest.raises(AttnInjectError, match=r"unknown gate 'tanh'.*Valid gates: sigmoid, hard_sigmoid"):
        SqueezeExcite(64, gate="tanh")
    with pytest.raises(AttnInjectError, match=r"unknown SE act 'gelu'.*Valid activations: relu, silu"):
        SqueezeExcite(64, act="gelu")
    with pytest.raises(AttnInjectError, match=r"unknown SE rd_of 'output'"):
        SqueezeExcite(64, rd_of="output")
    assert SqueezeExcite(72, rd_ratio=0.25, rd_round_limit=0.9).fc1.out_channels == 24  # timm round_channels
    assert SqueezeExcite(72, rd_ratio=0.25).fc1.out_channels == 16
    assert SqueezeExcite(96, rd_ratio=0.25, rd_of="input", block_in_channels=16, rd_divisor=1).fc1.out_channels == 4
    steps = ((1, 1), (96, 3))
    assert [EfficientChannelAttention(c, kernel_size=steps).conv.kernel_size[0] for c in (16, 95, 96, 320)] == [
        1,
        1,
        3,
        3,
    ]
    assert EfficientChannelAttention(256, kernel_size="adaptive").conv.kernel_size == (5,)
    with pytest.raises(AttnInjectError, match=r"ECA kernel_size steps \[\[96, 3\]\] give no k for 16 channels"):
        EfficientChannelAttention(16, kernel_size=((96, 3),))
    with pytest.raises(AttnInjectError, match=r"odd kernel_size >= 1; got kernel_size=2 for 96 channels"):
        EfficientChannelAttention(96, kernel_size=((1, 1), (96, 2)))


BROKEN = [
    (
        "name: x\nmatch: {kind: block}\noptions:\n  bam: {k: 1}\n",
        r"bad\.yaml:4: rule 'x': field 'options\.bam' is not a block; "
        r"expected one of: cbam, coord, eca, gc, gct, ge, se, simam",
    ),
    (
        "name: x\nmatch: {kind: block}\noptions:\n  se: {reduce: 4}\n",
        r"bad\.yaml:4: rule 'x': field 'options\.se' holds a bad option: block 'se' has no option 'reduce'",
    ),
    (
        "name: x\nmatch: {kind: block}\noptions:\n  se: {gate: tanh}\n",
        r"bad\.yaml:4: rule 'x': field 'options\.se' holds a bad option: unknown gate 'tanh'",
    ),
    (
        "name: x\nmatch: {kind: block}\noptions:\n  eca:\n    init: paper\n",
        r"bad\.yaml:5: rule 'x': field 'options\.eca\.init' is the caller's choice",
    ),
    (
        "name: x\nmatch: {kind: block}\ninsert: after_conv0\n",
        r"bad\.yaml:3: rule 'x': field 'insert' must be one of block_output, branch_end, after_convN for a block"
        r" rule, not 'after_conv0'",
    ),
    (
        "name: x\nmatch: {kind: unit}\ninsert: after_conv1\n",
        r"bad\.yaml:3: rule 'x': field 'insert' must be one of unit_output for a unit rule",
    ),
    (
        "name: x\nmatch: {kind: block, residual: maybe}\n",
        r"bad\.yaml:2: rule 'x': field 'match\.residual' must be true, false or 'any', not 'maybe'",
    ),
    (
        "name: x\nmatch: {kind: residual, class: 'X*'}\n",
        r"bad\.yaml:2: rule 'x': field 'match\.class' is not a known field; expected one of: kind, convs$",
    ),
]


@pytest.mark.parametrize("text,message", BROKEN)
def test_broken_placement_rules_name_file_line_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(AttnInjectError, match=message):
        resolve_rules(str(path))


def test_rule_options_apply_and_the_caller_wins(mobilenet_v2_plan):
    report = mobilenet_v2_plan("eca", "inverted_residual_all", kernel_size=5)
    assert {dict(s.options)["kernel_size"] for s in report} == {5} and {s.params for s in report} == {5}
    se = mobilenet_v2_plan("se", "inverted_residual_all")
    assert dict(se.sites[0].options) == {"block_in_channels": 32}


def test_se_inception_on_module_outputs():
    model = torchvision.models.googlenet(aux_logits=False, init_weights=False).eval()
    report = plan(model, "se", after="inception", example_input=torch.randn(1, 3, 96, 96))
    assert [s.path for s in report] == [
        "inception3a",
        "inception3b",
        "inception4a",
        "inception4b",
        "inception4c",
        "inception4d",
        "inception4e",
        "inception5a",
        "inception5b",
    ]
    assert [s.channels for s in report] == [256, 480, 512, 512, 512, 528, 832, 832, 1024]
    assert {s.where for s in report} == {"block output"}
