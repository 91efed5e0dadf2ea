"""SE and ECA on 1-D and 3-D conv maps (NCL: audio, time series; NCDHW: video, volumes): the blocks
take spatial_dims with the 2-D parameter counts and the exact identity; the analysis finds
residual, bottleneck, basic, inverted residual and unit places on such maps; rules take kernels as
an int (every dim) or a list per dim; token layouts and 2-D-only blocks are refused."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable

import pytest
import torch
import torchvision
from monai.networks.nets import SegResNet
from monai.networks.nets import resnet18 as monai_resnet18
from torch import nn

from attn_inject import AttnInjectError, inject, plan
from attn_inject.blocks import EfficientChannelAttention, SqueezeExcite, registered_block
from attn_inject.finetune import param_groups, set_trainable
from attn_inject.rules import ConvSpec
from attn_inject.rules.builtin import resolve_rules
from attn_inject.rules.documents import rule_document, rule_from_yaml, rule_to_yaml
from attn_inject.testing import look_trained, move_off_identity
from benchmarks.reconstruct import ND_CASES, load_by_order, rebuild
from tests.helpers.running import inject_exactly, outputs

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SHAPE = {1: (2, 8, 64), 3: (2, 8, 4, 8, 8)}  # an input of 8 channels


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the blocks ------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_blocks_have_the_2d_parameter_counts_and_layers_of_their_dims(dims):
    se, eca = SqueezeExcite(64, spatial_dims=dims), EfficientChannelAttention(64, spatial_dims=dims)
    assert (params(se), params(eca)) == (1096, 3)  # 64 -> 8 -> 64 with biases; k = 3
    assert type(se.fc1) is type(se.fc2) is CONV[dims] and se.fc1.weight.shape == (8, 64) + (1,) * dims
    assert type(eca.conv) is nn.Conv1d  # over the channels, at every dims
    assert se.gain == eca.gain == 2.0  # the gain-2 gate of the identity init


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dims", [1, 3])
def test_blocks_are_the_identity_bitwise_and_move_off_it(dims, dtype):
    x = (torch.randn(2, 16, *(5,) * dims) * 3).to(dtype)
    for block in (SqueezeExcite(16, rd_divisor=1, spatial_dims=dims), EfficientChannelAttention(16, spatial_dims=dims)):
        block = block.to(dtype)
        assert torch.equal(block(x), x)
        move_off_identity(block)
        y = block(x)
        assert y.shape == x.shape and y.dtype == dtype and not torch.equal(y, x)


def test_channels_last_3d_maps_stay_exact():
    x = torch.randn(2, 16, 3, 5, 5).to(memory_format=torch.channels_last_3d)
    for block in (SqueezeExcite(16, spatial_dims=3), EfficientChannelAttention(16, spatial_dims=3)):
        y = block(x)
        assert torch.equal(y, x) and y.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("bad", [0, 4, True])
def test_blocks_refuse_other_dims(bad):
    for cls, name in ((SqueezeExcite, "SE"), (EfficientChannelAttention, "ECA")):
        with pytest.raises(AttnInjectError, match=rf"{name} needs spatial_dims 1, 2 or 3 .* got spatial_dims={bad}$"):
            cls(16, spatial_dims=bad)


# --- hand-written 1-D and 3-D nets ------------------------------------------------------------


def conv_bn(dims: int, cin: int, cout: int, k: int = 3, groups: int = 1) -> list[nn.Module]:
    return [CONV[dims](cin, cout, k, padding=k // 2, groups=groups, bias=False), NORM[dims](cout)]


class Basic(nn.Module):
    def __init__(self, dims: int, c: int):
        super().__init__()
        self.branch = nn.Sequential(*conv_bn(dims, c, c), nn.ReLU(), *conv_bn(dims, c, c))

    def forward(self, x):
        return torch.relu(x + self.branch(x))


class Bottleneck(nn.Module):
    def __init__(self, dims: int, c: int):
        super().__init__()
        mid = c // 2
        self.branch = nn.Sequential(
            *conv_bn(dims, c, mid, 1), nn.ReLU(), *conv_bn(dims, mid, mid), nn.ReLU(), *conv_bn(dims, mid, c, 1)
        )

    def forward(self, x):
        return torch.relu(x + self.branch(x))


class Inverted(nn.Module):
    def __init__(self, dims: int, c: int):
        super().__init__()
        wide = 2 * c
        self.branch = nn.Sequential(
            *conv_bn(dims, c, wide, 1),
            nn.ReLU6(),
            *conv_bn(dims, wide, wide, 3, wide),
            nn.ReLU6(),
            *conv_bn(dims, wide, c, 1),
        )

    def forward(self, x):
        return x + self.branch(x)


def nd_resnet(dims: int) -> nn.Module:
    """A stem unit, then a basic, a bottleneck and an inverted residual block, on maps of ``dims``."""
    model = nn.Sequential(
        *conv_bn(dims, 8, 16), nn.ReLU(), Basic(dims, 16), Bottleneck(dims, 16), Inverted(dims, 16),
        nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    return look_trained(model.eval())


# rule -> the module path it patches
PLACES = {"basic": "3", "bottleneck": "4", "inverted_residual": "5"}


@pytest.mark.parametrize("dims", [1, 3])
def test_hand_written_nets_get_each_rule_bitwise(dims):
    model, x = nd_resnet(dims), torch.randn(SHAPE[dims])
    report = plan(model, "se", after=sorted(PLACES), rd_divisor=1, example_input=x)
    assert {s.rule: s.path for s in report} == PLACES
    assert [s.shape for s in report] == [(2, 16, *SHAPE[dims][2:])] * 3
    assert [dict(s.options)["spatial_dims"] for s in report] == [dims] * 3
    layout = {1: "NCL", 3: "NCDHW"}[dims]
    map_words = "x".join(map(str, (16, *SHAPE[dims][2:])))
    assert (
        f": bottleneck at branch end (before the add), 16 channels on a {dims}-D map {map_words} {layout}, +49 params"
        in str(report.sites[1])
    )
    assert report.params_added == (16 * 1 + 1 + 1 * 16 + 16) * 3  # rd = 16 / 16 = 1
    inject_exactly(model, x, "eca", after="residual", example_input=x)
    assert [n for n, m in model.named_modules() if isinstance(m, EfficientChannelAttention)] == [
        "3.eca",
        "4.eca",
        "5.eca",
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_channels_last_3d_model_stays_exact(dtype):
    model = nd_resnet(3).to(memory_format=torch.channels_last_3d).to(dtype)
    x = torch.randn(SHAPE[3]).to(memory_format=torch.channels_last_3d).to(dtype)
    inject_exactly(model, x, "se", after="residual", example_input=x)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv_units_on_nd_maps(dims):
    model, x = nd_resnet(dims), torch.randn(SHAPE[dims])
    report = plan(model, "eca", after="conv", example_input=x)
    assert len(report) == 9 and report.params_added == 9 * 3  # 1 stem + 2 + 3 + 3 conv -> norm units
    inject_exactly(model, x, "se", after="conv", example_input=x)


def test_finetune_helpers_train_the_blocks_of_a_3d_model():
    model, x = nd_resnet(3), torch.randn(SHAPE[3])
    inject(model, "se", after="residual", rd_divisor=1, example_input=x)
    set_trainable(model, "attention")
    groups = param_groups(model, lr=0.1)
    assert [(g["name"], sum(p.numel() for p in g["params"])) for g in groups] == [
        ("attention", 3 * 16),  # fc1's 1x1x1 conv weights
        ("attention_no_decay", 3 * (1 + 16 + 16)),  # biases, and fc2 (the gate layer: no weight decay)
    ]
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".se." not in f".{k}"}
    before = outputs(model, x)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    model(x).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(outputs(model, x), before)


def test_a_2d_only_block_is_refused_before_any_change():
    class Scale2d(nn.Module):  # no spatial_dims: 2-D only
        def __init__(self, channels: int, init: str = "identity"):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, channels, 1, 1))

        def forward(self, x):
            return x + x * self.w

    model, x = nd_resnet(3), torch.randn(SHAPE[3])
    keys, before = list(model.state_dict()), outputs(model, x)
    with (
        registered_block("scale2d", Scale2d),
        pytest.raises(
            AttnInjectError,
            match=r"^3: block 'scale2d' \(Scale2d\) serves 2-D maps only, and this site is on a 3-D map "
            r"\[2, 16, 4, 8, 8\] \(NCDHW\)\. A block serves 1-D and 3-D maps when its __init__ takes spatial_dims",
        ),
    ):
        inject(model, "scale2d", after="residual", example_input=x)
    assert list(model.state_dict()) == keys and torch.equal(outputs(model, x), before)


# --- rules: kernels per dim -------------------------------------------------------------------


def test_kernel_int_is_every_dim_and_a_list_is_exact():
    spec, per_dim = ConvSpec(3), ConvSpec((1, 3, 3))
    assert spec.matches((3,), False, 8, 8) and spec.matches((3, 3, 3), False, 8, 8)
    assert not spec.matches((1, 3, 3), False, 8, 8)
    assert per_dim.matches((1, 3, 3), False, 8, 8) and not per_dim.matches((3, 3), False, 8, 8)


def test_yaml_kernel_lists_of_one_to_three_dims(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("name: k\nmatch:\n  kind: residual\n  convs:\n    - {kernel: [1, 3, 3]}\n    - {kernel: [3]}\n")
    assert resolve_rules(str(path))[0].convs == (ConvSpec((1, 3, 3)), ConvSpec((3,)))
    for bad in ("[1, 3, 3, 3]", "[0, 3]", "[]"):
        path.write_text(f"name: k\nmatch:\n  kind: residual\n  convs:\n    - {{kernel: {bad}}}\n")
        with pytest.raises(
            AttnInjectError, match=r"k\.yaml:5: rule 'k': field 'match\.convs\[0\]\.kernel' must be a positive int"
        ):
            resolve_rules(str(path))


SE_OR_ECA = (SqueezeExcite, EfficientChannelAttention)


def r3d_18() -> nn.Module:
    return torchvision.models.video.r3d_18(num_classes=10)


def r2plus1d_18() -> nn.Module:
    return torchvision.models.video.r2plus1d_18(num_classes=10)


def monai_resnet1d() -> nn.Module:
    return monai_resnet18(spatial_dims=1, n_input_channels=1, num_classes=2)


def monai_resnet3d() -> nn.Module:
    return monai_resnet18(spatial_dims=3, n_input_channels=1, num_classes=2)


def segresnet() -> nn.Module:
    return SegResNet(3, in_channels=1, out_channels=2, init_filters=8)


def test_rules_with_kernels_per_dim_travel_in_recipes(tmp_path):
    """A recipe's rule document keeps an int as an int (every dim) and a list as a list (exact);
    an old recipe's [1, 1] stays an exact 2-D kernel."""
    path = tmp_path / "r.yaml"
    path.write_text(R2PLUS1D_BASIC)
    rule = resolve_rules(str(path))[0]
    mixed = dataclasses.replace(rule, convs=(ConvSpec(3), *rule.convs[1:]))
    text = rule_to_yaml(mixed)
    assert rule_from_yaml(text, "recipe").convs == mixed.convs
    assert [c["kernel"] for c in rule_document(mixed)["match"]["convs"]] == [3, [3, 1, 1], [1, 3, 3], [3, 1, 1]]
    old = rule_from_yaml(text.replace("kernel: 3", "kernel: [1, 1]", 1), "recipe")
    assert old.convs is not None and old.convs[0] == ConvSpec((1, 1))


R2PLUS1D_BASIC = """name: basic_2plus1d
description: R(2+1)D basic block - (1x3x3 spatial, 3x1x1 temporal) twice
match:
  kind: residual
  convs: [{kernel: [1, 3, 3]}, {kernel: [3, 1, 1]}, {kernel: [1, 3, 3]}, {kernel: [3, 1, 1]}]
insert: branch_end
"""

VIDEO_X = (1, 3, 2, 16, 16)


@functools.cache
def _built(factory: Callable[[], nn.Module]) -> nn.Module:
    return look_trained(factory().eval())


def built(factory: Callable[[], nn.Module]) -> nn.Module:
    """A fresh copy of one trained-looking model per factory (building a 30M-parameter model is slow)."""
    return copy.deepcopy(_built(factory))


def patched_exactly(model: nn.Module, x: torch.Tensor, block: str, after: str, **kwargs) -> tuple[list[str], int]:
    """inject_exactly, then the paths of the new blocks and the parameters they add."""
    before = params(model)
    inject_exactly(model, x, block, after=after, example_input=x, **kwargs)
    cls = {"se": SqueezeExcite, "eca": EfficientChannelAttention}[block]
    return [name for name, m in model.named_modules() if isinstance(m, cls)], params(model) - before


@pytest.mark.parametrize("block,added", [("se", 90112), ("eca", 36)])
def test_torchvision_r3d_18(block, added):
    model, x = built(r3d_18), torch.randn(VIDEO_X)
    names, more = patched_exactly(model, x, block, "basic")  # kernel: 3 is 3x3x3 here
    assert (names, more) == ([f"layer{i}.{j}.{block}" for i in range(1, 5) for j in range(2)], added)


@pytest.mark.parametrize("block,added", [("se", 90112), ("eca", 36)])
def test_torchvision_r2plus1d_18_by_kernels_per_dim(tmp_path, block, added):
    """Its branches are 1x3x3 -> 3x1x1 twice, matched by a rule of kernels per dim."""
    model, x = built(r2plus1d_18), torch.randn(VIDEO_X)
    rule = tmp_path / "r2plus1d.yaml"
    rule.write_text(R2PLUS1D_BASIC)
    names, more = patched_exactly(model, x, block, str(rule))
    assert (names, more) == ([f"layer{i}.{j}.{block}" for i in range(1, 5) for j in range(2)], added)


@pytest.mark.parametrize("dims,shape", [(1, (1, 1, 64)), (3, (1, 1, 8, 8, 8))])
@pytest.mark.parametrize("block,added", [("se", 90112), ("eca", 36)])
def test_monai_resnet18(dims, shape, block, added):
    model, x = built(monai_resnet1d if dims == 1 else monai_resnet3d), torch.randn(shape)
    names, more = patched_exactly(model, x, block, "basic")
    assert (names, more) == ([f"layer{i}.{j}.{block}" for i in range(1, 5) for j in range(2)], added)
    assert {type(m.fc1 if block == "se" else m.conv) for m in model.modules() if isinstance(m, SE_OR_ECA)} == {
        CONV[dims] if block == "se" else nn.Conv1d
    }


def test_monai_segresnet_resblocks_and_its_skips_are_merges():
    model, x = built(segresnet), torch.randn(1, 1, 16, 16, 16)
    report = plan(model, "se", after="residual", example_input=x)
    assert (len(report), report.params_added) == (12, 7168)  # its 12 pre-activation ResBlocks
    assert [s.channels for s in report] == [8, 16, 16, 32, 32, 64, 64, 64, 64, 32, 16, 8]
    assert [m.reason for m in report.misses] == [
        f"add {n} merges maps of two resolutions (one side's last conv gives [1, {c}, {s}, {s}, {s}], resized to "
        f"[1, {c}, {2 * s}, {2 * s}, {2 * s}]): a merge, not a residual"
        for n, c, s in (("add", 32, 2), ("add_1", 16, 4), ("add_2", 8, 8))
    ]  # the U-Net skip adds
    inject_exactly(model, x, "se", after="residual", example_input=x)


def test_monai_segresnet_eca():
    names, more = patched_exactly(built(segresnet), torch.randn(1, 1, 16, 16, 16), "eca", "residual")
    assert (len(names), more) == (12, 36)


def test_speechbrain_ecapa_se_is_recognised_never_doubled():
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    model = look_trained(ECAPA_TDNN(40, lin_neurons=32, channels=[32, 32, 32, 32, 96]).eval())
    x = torch.randn(1, 20, 40)  # (batch, time, features)
    with pytest.raises(
        AttnInjectError,
        match=r"matched nothing in ECAPA_TDNN; the model contains: residual x3; 3 place\(s\) already hold channel "
        r"attention \(e\.g\. blocks\.1: blocks\.1\.se_block: SEBlock\): skipped",
    ):
        plan(model, "se", after="residual", example_input=x)
    stacked = plan(model, "eca", after="residual", example_input=x, stack=True)
    assert [s.path for s in stacked] == ["blocks.1", "blocks.2", "blocks.3"] and len(stacked.attended) == 3


def test_conformer_token_residuals_beside_conv1d_are_refused():
    """Conformer runs a Conv1d on (B, C, T) and adds on (T, B, C): 3-D, but tokens, not NCL."""
    import torchaudio

    model = torchaudio.models.Conformer(
        input_dim=16, num_heads=2, ffn_dim=32, num_layers=1, depthwise_conv_kernel_size=3
    ).eval()
    x, lengths = torch.randn(2, 16, 16), torch.tensor([16, 16])  # time = features = 16
    with pytest.raises(AttnInjectError) as info:
        plan(model, "eca", after="residual", example_input=(x, lengths))
    assert "residual add is on a 3-D tensor [16, 2, 16], not an NCHW map (nor an NCL map of a conv)" in str(info.value)


def test_monai_seresnet50_3d_is_rebuilt_from_its_attention_free_twin():
    """init="paper" with MONAI's ChannelSELayer weights (linears, mapped onto the 1x1x1 convs) computes
    SEResNet50 (3-D); the identity init leaves the twin bit for bit."""
    (case,) = ND_CASES
    hand, plain, patched = rebuild(case, "paper")
    pairs = load_by_order(patched, plain, hand)
    assert len(pairs) == 64 and pairs[0] == ("layer1.0.se_layer.fc.0.weight", "layer1.0.se.fc1.weight")
    assert params(patched) == params(hand) == params(plain) + 2_530_992  # MONAI's 16 SE layers
    x = torch.randn(case.sample(64))
    expected, got, without = outputs(hand, x), outputs(patched, x), outputs(plain, x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6) and not torch.allclose(without, expected, atol=1e-3)
    identity = inject(copy.deepcopy(plain), "se", after="bottleneck", rd_divisor=1, example_input=case.example_input())
    assert torch.equal(outputs(identity, x), without)
