"""A place that already holds channel attention (timm's SE / ECA modules, MONAI's Linear SE, a gate
written by hand in either operand order, an SE on a 1x1 map, selective-kernel, split and coordinate
attention) gets no second block unless ``stack=True``; plan lists it in ``misses`` and counts it."""

import pytest
import timm
import torch
from monai.networks.blocks import ChannelSELayer
from torch import nn

from attn_inject import AttnInjectError, inject, plan
from attn_inject.finetune import attention_blocks
from attn_inject.graph.analyze import analyze
from attn_inject.graph.attention import gated_modules
from attn_inject.testing import look_trained, move_off_identity
from tests.helpers.cli import last_json, run_cli
from tests.helpers.tiny_models import conv_bn

X = torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize(
    "name,block,own",
    [("seresnet18", "se", "SEModule"), ("ecaresnet26t", "eca", "EcaModule")],
)
def test_timm_attention_models_get_no_second_block_without_stack(name, block, own):
    model = timm.create_model(name, num_classes=10).eval()
    with pytest.raises(
        AttnInjectError,
        match=rf"matched nothing in ResNet; the model contains: \w+ x8, conv x\d+, residual x8; 8 place\(s\) "
        rf"already hold channel attention \(e\.g\. layer1\.0: layer1\.0\.se: {own}\): skipped \(stack=True adds "
        rf"another\)",
    ):
        inject(model, block, after="residual", example_input=X)
    assert not attention_blocks(model)
    stacked = plan(model, block, after="residual", example_input=X, stack=True)
    assert len(stacked) == 8 and len(stacked.attended) == 8 and stacked.stacked
    assert stacked.sites[0].module_name == "layer1.0." + ("se_1" if block == "se" else "eca")


def test_tresnet_blocks_go_only_where_it_has_no_se():
    model = look_trained(timm.create_model("tresnet_m", num_classes=10))
    report = plan(model, "eca", after="residual", example_input=X)
    assert [s.path for s in report] == ["body.layer4.0", "body.layer4.1", "body.layer4.2"]
    assert len(report.attended) == 18 and report.summary()["existing_attention"] == 18
    missed = [m for m in report.misses if m.attention]
    assert len(missed) == 18 and missed[0] == type(missed[0])(
        "body.layer1.0",
        "already holds channel attention (body.layer1.0.se: SEModule); stack=True adds another",
        attention="body.layer1.0.se: SEModule",
    )
    assert "18 place(s) already hold channel attention" in report.note("attended")
    assert len(plan(model, "eca", after="residual", example_input=X, stack=True)) == 21


class GateFirstSE(nn.Module):
    """SpeechBrain's ECAPA SEBlock in 2-D: 1x1 convs on the mean, the gate the FIRST operand."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        s = torch.sigmoid(self.conv2(torch.relu(self.conv1(x.mean((2, 3), keepdim=True)))))
        return s * x


class LayerScale(nn.Module):
    """A per-channel parameter: not computed from the map, not a gate."""

    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((1, c, 1, 1), 0.5))

    def forward(self, x):
        return x * self.gamma


class NormScale(nn.Module):
    """ConvNeXt-V2's GRN in NCHW: a per-channel factor from the map, but no learned layer on its path."""

    def forward(self, x):
        g = x.norm(p=2, dim=(2, 3), keepdim=True)
        return x * (g / (g.mean(dim=1, keepdim=True) + 1e-6))


class Residual(nn.Module):
    def __init__(self, c: int, extra: nn.Module):
        super().__init__()
        self.conv, self.bn = conv_bn(c, c)
        self.extra = extra

    def forward(self, x):
        return x + self.extra(self.bn(self.conv(x)))


def net(*extras: nn.Module) -> nn.Sequential:
    return nn.Sequential(*conv_bn(3, 16), *(Residual(16, e) for e in extras))


def test_structural_gates_whatever_their_class():
    model = look_trained(net(ChannelSELayer(2, 16), GateFirstSE(16), LayerScale(16), NormScale()))
    report = plan(model, "eca", after="residual", example_input=X)
    assert [s.path for s in report] == ["4", "5"]  # the layer scale and the normalisation are no gates
    assert [(m.path, m.attention) for m in report.misses] == [
        ("2", "2.extra: ChannelSELayer"),
        ("3", "3.extra: GateFirstSE"),
    ]
    with torch.no_grad():
        before = model(X)
    inject(model, "eca", after="residual", example_input=X)
    assert sorted(attention_blocks(model)) == ["4.eca", "5.eca"]
    move_off_identity(model)
    with torch.no_grad():
        assert not torch.equal(model(X), before)


@pytest.mark.parametrize(
    "name,places,own",
    [("skresnet18", 8, "layer1.0.conv1: SelectiveKernel"), ("resnest14d", 4, "layer1.0.conv2: SplitAttn")],
)
def test_selective_kernel_and_split_attention_are_attention(name, places, own):
    """SKNet and ResNeSt weigh [N, paths, C, H, W] by [N, paths, C, 1, 1]: a gate over three leading axes."""
    model = look_trained(timm.create_model(name, num_classes=10))
    with pytest.raises(AttnInjectError, match=rf"{places} place\(s\) already hold channel attention \(e\.g\. "):
        plan(model, "se", after="residual", example_input=X)
    stacked = plan(model, "se", after="residual", example_input=X, stack=True)
    assert len(stacked) == places and stacked.attended[0] == ("layer1.0", own) and len(stacked.attended) == places


class RadixGate(nn.Module):
    """Split attention written by hand: two paths, one softmax over them per channel."""

    def __init__(self, c: int):
        super().__init__()
        self.paths = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.fc = nn.Conv2d(c, 2 * c, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        paths = self.paths(x).view(n, 2, c, h, w)
        weights = torch.softmax(self.fc(paths.sum(1).mean((2, 3), keepdim=True)).view(n, 2, c, 1, 1), dim=1)
        return (paths * weights).sum(1)


class CoordGate(nn.Module):
    """Coordinate attention written by hand: the map weighed by [N, C, H, 1] and [N, C, 1, W]."""

    def __init__(self, c: int):
        super().__init__()
        self.squeeze, self.rows, self.cols = nn.Conv2d(c, 8, 1), nn.Conv2d(8, c, 1), nn.Conv2d(8, c, 1)

    def forward(self, x):
        h, w = x.shape[2:]
        pooled = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], 2)
        rows, cols = torch.split(torch.relu(self.squeeze(pooled)), [h, w], 2)
        return x * torch.sigmoid(self.rows(rows)) * torch.sigmoid(self.cols(cols.transpose(2, 3)))


class MapProduct(nn.Module):
    """A map times a map of its own shape computed through a conv: no vector, no gate."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


def test_gates_over_more_leading_axes():
    model = look_trained(net(RadixGate(16), CoordGate(16), MapProduct(16)))
    report = plan(model, "eca", after="residual", example_input=X)
    assert [s.path for s in report] == ["4"]
    assert [(m.path, m.attention) for m in report.misses] == [("2", "2.extra: RadixGate"), ("3", "3.extra: CoordGate")]


def test_an_se_on_a_1x1_map_is_a_gate():
    """Gate and map have the same size there: the vector's shape, not a size difference, tells it."""
    model = net(GateFirstSE(16)).eval()
    assert list(gated_modules(analyze(model, (torch.randn(1, 3, 1, 1),))).values()) == ["2.extra"]
    with pytest.raises(AttnInjectError, match=r"1 place\(s\) already hold channel attention"):
        plan(model, "eca", after="residual", example_input=torch.randn(1, 3, 1, 1))


def test_plan_command_counts_existing_attention(capsys):
    code, out, _ = run_cli(
        capsys, "plan", "--arch", "seresnet18", "--block", "eca", "--after", "residual", "--img-size", "64", "--stack"
    )
    assert code == 0 and "8 places already hold channel attention: a block stacked on each (--stack)" in " ".join(
        out.split()
    )
    code, out, _ = run_cli(
        capsys, "plan", "--arch", "seresnet18", "--block", "eca", "--after", "residual", "--img-size", "64",
        "--stack", "--json",
    )  # fmt: skip
    summary = last_json(out)
    assert code == 0 and summary["existing_attention"] == 8 and summary["stacked"] is True
    assert summary["attended"][0] == {"path": "layer1.0", "attention": "layer1.0.se: SEModule"}
