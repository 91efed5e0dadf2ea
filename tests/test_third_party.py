"""Models from other libraries as users get them: Hugging Face transformers vision models (built from
small configs, nothing is downloaded), torchvision detection parts, timm's hook-based feature
extractor. Weights are made to look trained (attn_inject.testing.look_trained) so that a block at a
branch end is not hidden by a zero init, and every test moves the blocks off identity to see them act."""

import copy
import io
import logging

import pytest
import timm
import torch
import torchvision
import transformers as hf
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from attn_inject import AttnInjectError, inject, plan
from attn_inject.graph.example import first_difference
from attn_inject.testing import blocks_not_run, look_trained, move_off_identity

BIT = dict(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], num_groups=8)
DPT_HYBRID = dict(
    is_hybrid=True,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=64,
    backbone_out_indices=(0, 1, 2, 3),
    neck_hidden_sizes=(32, 64, 32, 32),
    fusion_hidden_size=32,
    backbone_featmap_shape=(1, 128, 4, 4),
    backbone_config=hf.BitConfig(
        **BIT,
        layer_type="bottleneck",
        global_padding="SAME",
        embedding_dynamic_padding=True,
        out_features=["stage1", "stage2", "stage3"],
    ),
)

# name: (model class, config, ECA sites after "residual", modules legitimately not reached)
HF_MODELS = {
    "resnet": (
        hf.ResNetForImageClassification,
        hf.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2]),
        3,
        (),
    ),
    "convnext": (
        hf.ConvNextForImageClassification,
        hf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2),
        3,
        (),
    ),
    "regnet": (
        hf.RegNetForImageClassification,
        hf.RegNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], groups_width=8),
        3,
        (),
    ),
    "mobilenet_v2": (hf.MobileNetV2ForImageClassification, hf.MobileNetV2Config(depth_multiplier=0.25), 10, ()),
    # only the residual rule: the expand and depthwise convs sit in sibling modules of the add's (issue 9, item 2)
    "efficientnet": (
        hf.EfficientNetForImageClassification,
        hf.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.3, hidden_dim=320),
        1,
        (),
    ),
    "bit": (hf.BitForImageClassification, hf.BitConfig(**BIT), 3, ()),
    "mobilevit": (
        hf.MobileViTForImageClassification,
        hf.MobileViTConfig(hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 64]),
        3,
        (),
    ),
    # the first fusion layer is called without a residual, so its residual_layer1 never runs
    "dpt_hybrid": (
        hf.DPTForDepthEstimation,
        hf.DPTConfig(**DPT_HYBRID),
        10,
        ("neck.fusion_stage.layers.0.residual_layer1",),
    ),
}

# models whose residual branches hold their own squeeze-excitation: (name: places that hold it)
HOLD_SE = {"regnet": 3, "efficientnet": 1}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_transformers_model_patches_bitwise_and_keeps_its_output_type(name, caplog):
    cls, config, sites, unreached = HF_MODELS[name]
    x = torch.randn(2, 3, 64, 64)
    model = look_trained(cls(config), x)
    with torch.no_grad():
        expected = {
            "pixel_values=": model(pixel_values=x),
            "positional": model(x),
            "tuple": model(x, return_dict=False),
        }
    assert type(expected["positional"]) is not dict and isinstance(expected["tuple"], tuple)

    stack = name in HOLD_SE  # a second block beside the model's own SE, as every site is then patched
    report = plan(model, "eca", after="residual", example_input=x[:1], stack=stack)
    assert len(report) == sites and report.unreached == unreached and len(report.attended) == HOLD_SE.get(name, 0)
    with caplog.at_level(logging.WARNING, logger="attn_inject"):
        inject(model, "eca", after="residual", example_input=x[:1], stack=stack)
    assert ("not reached" in caplog.text) == bool(unreached)  # ConvNeXt's iterated downsampling_layer is reached

    with torch.no_grad():
        actual = {"pixel_values=": model(pixel_values=x), "positional": model(x), "tuple": model(x, return_dict=False)}
    for call, out in actual.items():
        assert type(out) is type(expected[call]), call
        assert first_difference(expected[call], out) is None, call
    assert blocks_not_run(model, x) == 0
    move_off_identity(model)
    with torch.no_grad():
        assert first_difference(expected["positional"], model(x)) is not None


def test_transformers_mobilenet_v1_is_analysed_without_failing():
    """No residual in MobileNetV1: the example forward through its ModelOutputs now runs and the rule
    reports that it matched nothing (before: the example forward failed)."""
    model = look_trained(hf.MobileNetV1ForImageClassification(hf.MobileNetV1Config(depth_multiplier=0.25)))
    with pytest.raises(AttnInjectError, match=r"rule 'residual' matched nothing in MobileNetV1ForImageClassification"):
        plan(model, "eca", after="residual", example_input=torch.randn(1, 3, 64, 64))


def test_transformers_mobilenet_v1_conv_units_inside_untraceable_modules():
    """Every MobileNetV1ConvLayer is untraceable (TF "same" padding reads the input's size), so its
    conv -> BN units are found from the calls it makes: 1 stem + 13 x (depthwise, pointwise) = 27."""
    x = torch.randn(2, 3, 64, 64)
    model = look_trained(hf.MobileNetV1ForImageClassification(hf.MobileNetV1Config(depth_multiplier=0.25)), x)
    with torch.no_grad():
        expected = model(x)
    report = plan(model, "eca", after="conv", example_input=x[:1])
    assert len(report) == 27 and dict(report.untraced)["mobilenet_v1.conv_stem"].startswith("TraceError")
    inject(model, "eca", after="conv", example_input=x[:1])
    with torch.no_grad():
        actual = model(x)
    assert type(actual) is type(expected) and first_difference(expected, actual) is None
    assert blocks_not_run(model, x) == 0
    move_off_identity(model)
    with torch.no_grad():
        assert first_difference(expected, model(x)) is not None


def test_transformers_efficientnet_branch_across_sibling_modules_is_an_inverted_residual():
    """The add sits in EfficientNetFinalBlockLayer, whose own branch is only the 1x1 projection; the
    expand and depthwise convs are in sibling modules: inverted_residual sees the whole branch."""
    x = torch.randn(2, 3, 64, 64)
    config = hf.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.3, hidden_dim=320)
    model = look_trained(hf.EfficientNetForImageClassification(config), x)
    with torch.no_grad():
        expected = model(x)
    report = plan(model, "eca", after="inverted_residual", example_input=x[:1], stack=True)  # beside its own SE
    assert [s.owner for s in report.sites] == ["efficientnet.encoder.blocks.6.projection"]
    inject(model, "eca", after="inverted_residual", example_input=x[:1], stack=True)
    with torch.no_grad():
        assert first_difference(expected, model(x)) is None


def test_lraspp_merge_of_two_heads_is_not_a_residual():
    """LR-ASPP adds low_classifier(low) + high_classifier(high): two maps that do not fork from one
    tensor. It is reported as a merge, and only the backbone's 10 residuals are sites."""
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    report = plan(look_trained(model), "eca", after="residual", example_input=torch.randn(1, 3, 64, 64), stack=True)
    assert len(report) == 10 and all(s.owner.startswith("backbone.") for s in report.sites)
    assert len(report.attended) == 5  # MobileNetV3's SqueezeExcitation, beside which stack=True adds ECA
    merges = [m for m in report.misses if "do not fork from one tensor" in str(m.reason)]
    assert [m.path for m in merges] == ["classifier"]


class ResNetFPN(nn.Module):
    """A user's detector neck: torchvision's FeaturePyramidNetwork (no extra blocks) on a ResNet's
    stages, fed the OrderedDict of features IntermediateLayerGetter returns."""

    def __init__(self):
        super().__init__()
        self.body = IntermediateLayerGetter(
            torchvision.models.resnet18(), {"layer2": "c3", "layer3": "c4", "layer4": "c5"}
        )
        self.fpn = FeaturePyramidNetwork([128, 256, 512], 16)

    def forward(self, x):
        return self.fpn(self.body(x))


def test_fpn_top_down_adds_are_merges_not_residuals():
    """FPN's ``lateral(c) + upsample(p)`` adds two maps that meet only through the dict of stage
    outputs: listed as merges, never patched; the ResNet's 8 residuals are. (torchvision's whole
    detectors add extra blocks whose tuple output fx cannot unpack: their FPN runs as it is.)"""
    x = torch.randn(2, 3, 64, 64)
    model = look_trained(ResNetFPN(), x)
    with torch.no_grad():
        expected = model(x)
    report = plan(model, "eca", after="residual", example_input=x[:1])
    assert len(report) == 8 and all(s.owner.startswith("body.layer") for s in report.sites)
    merges = [m for m in report.misses if "do not fork from one tensor" in str(m.reason)]
    assert [m.path for m in merges] == ["fpn", "fpn"]
    inject(model, "eca", after="residual", example_input=x[:1])
    with torch.no_grad():
        assert first_difference(expected, model(x)) is None


def test_module_that_traces_but_fails_to_run_falls_back_to_eager():
    """torchvision's LastLevelP6P7 traces, but its graph fails (its list of names becomes strings):
    it runs eagerly, and the ResNet blocks around it are still patched."""
    body = torchvision.models.resnet18()
    model = BackboneWithFPN(
        body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], 16, extra_blocks=LastLevelP6P7(16, 16)
    )
    x = torch.randn(2, 3, 64, 64)
    look_trained(model, x)
    with torch.no_grad():
        expected = model(x)
    report = plan(model, "eca", after="residual", example_input=x[:1])
    assert (
        dict(report.untraced)["fpn.extra_blocks"]
        == "traced, but its graph failed on the example: AttributeError: 'str' object has no attribute 'extend'"
    )
    assert len(report) == 8
    inject(model, "eca", after="residual", example_input=x[:1])
    with torch.no_grad():
        actual = model(x)
    assert type(actual) is type(expected) and list(actual) == ["0", "1", "2", "p6", "p7"]  # an OrderedDict stays one
    assert first_difference(expected, actual) is None
    assert blocks_not_run(model, x) == 0
    move_off_identity(model)
    with torch.no_grad():
        assert first_difference(expected, model(x)) is not None


def test_hook_based_feature_extractor_keeps_its_hook_state():
    """timm's features_only with feature_cls="hook" reads what its hooks collected: tracing it stored a
    Proxy in that state, and copy.deepcopy / torch.save of the model failed afterwards."""
    model = look_trained(timm.create_model("resnet18", features_only=True, feature_cls="hook"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    state = {key: list(value) for key, value in model.hooks._feature_outputs.items()}
    report = plan(model, "eca", after="residual", example_input=x[:1])
    assert dict(report.untraced)["<model>"].startswith("its result does not depend on its inputs or children")
    inject(model, "eca", after="residual", example_input=x[:1])
    assert (
        {key: list(value) for key, value in model.hooks._feature_outputs.items()} == state == {torch.device("cpu"): []}
    )
    copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    with torch.no_grad():
        actual = model(x)
    assert len(actual) == 5 and all(torch.equal(a, e) for a, e in zip(actual, expected))
    assert len(report) == 8 and blocks_not_run(model, x) == 0
