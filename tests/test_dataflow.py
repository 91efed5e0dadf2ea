"""Residuals judged from the data flow across module boundaries: branches that start in a parent,
merges that are not residuals, train-only ops, units inside untraceable modules."""

import pytest
import torch
import torchvision
from torch import nn

from attn_inject import AttnInjectError, inject, plan
from attn_inject.finetune import attention_blocks
from attn_inject.testing import look_trained
from tests.helpers.graph_models import BackboneWithFPNLike, LRASPPLike, SplitEfficientNet
from tests.helpers.running import outputs

X = torch.randn(2, 3, 64, 64)
EXAMPLE = torch.randn(1, 3, 64, 64)


def assert_identity_then_live(model, before, x=X):
    after = outputs(model, x)
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.utils._pytree.tree_leaves(after), torch.utils._pytree.tree_leaves(before))
    )
    with torch.no_grad():
        for block in attention_blocks(model).values():
            block.conv.weight.fill_(0.5)
    moved = torch.utils._pytree.tree_leaves(outputs(model, x))
    assert not all(torch.equal(a, b) for a, b in zip(moved, torch.utils._pytree.tree_leaves(before)))


def test_branch_that_starts_in_the_parent_matches_inverted_residual():
    model = look_trained(SplitEfficientNet())  # every block holds its own SE: stack beside it
    sites = plan(model, "eca", after="inverted_residual", example_input=EXAMPLE, stack=True)
    # blocks.1 changes width and stride: no add; the others add in their projection layer
    assert [(s.path, s.owner, s.name, s.channels) for s in sites] == [
        ("blocks.0.projection", "blocks.0.projection", "eca", 8),
        ("blocks.2.projection", "blocks.2.projection", "eca", 16),
        ("blocks.3.projection", "blocks.3.projection", "eca", 16),
    ]
    before = outputs(model, X)
    inject(model, "eca", after="inverted_residual", example_input=EXAMPLE, stack=True)
    assert sorted(attention_blocks(model)) == [
        "blocks.0.projection.eca",
        "blocks.2.projection.eca",
        "blocks.3.projection.eca",
    ]
    assert_identity_then_live(model, before)


def test_branch_ops_are_collected_from_the_fork_to_the_add():
    from attn_inject.graph.analyze import analyze
    from attn_inject.matching.candidates import find_candidates

    candidates, _ = find_candidates(analyze(SplitEfficientNet().eval(), (EXAMPLE,)))
    residual = next(c for c in candidates if c.kind == "residual" and c.path == "blocks.2.projection")
    assert [op.path for op in residual.ops] == [
        "blocks.2.expansion.0",
        "blocks.2.expansion.1",
        "blocks.2.depthwise_conv.0",
        "blocks.2.depthwise_conv.1",
        "blocks.2.projection.project_conv",
        "blocks.2.projection.project_bn",
    ]  # the squeeze-excite gate's convs are not the branch's


def test_lraspp_style_sum_of_two_classifiers_is_a_merge_not_a_residual():
    model = look_trained(LRASPPLike())
    report = plan(model, "eca", after="residual", example_input=EXAMPLE)
    assert [s.path for s in report] == ["backbone.layer1", "backbone.layer2"]
    assert [(m.path, m.reason) for m in report.misses] == [
        ("classifier", "add add merges two maps that do not fork from one tensor (seen in <model>): not a residual")
    ]  # the head's dict of features is fixed by its keys: each map is followed back into the model's graph
    before = outputs(model, X)
    inject(model, "eca", after="residual", example_input=EXAMPLE)
    assert_identity_then_live(model, before)


def test_fpn_top_down_add_is_a_merge():
    model = look_trained(BackboneWithFPNLike())
    report = plan(model, "se", after="residual", example_input=EXAMPLE)
    assert [s.path for s in report] == ["body.layer1", "body.layer2"]
    assert ("fpn", "add add merges two maps that do not fork from one tensor (seen in <model>): not a residual") in [
        (m.path, m.reason) for m in report.misses
    ]


def test_only_merges_is_an_error_that_says_so():
    with pytest.raises(
        AttnInjectError,
        match=r"rule 'residual' matched nothing in LRASPPLike.*1 residual add\(s\) were not usable "
        r"\(e.g. classifier: add add merges two maps",
    ):
        plan(LRASPPLike(), "eca", after="residual", include="classifier*", example_input=EXAMPLE)


def test_torchvision_lraspp_classifier_gets_no_block():
    model = look_trained(torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None))
    report = plan(model, "eca", after="residual", example_input=EXAMPLE, stack=True)  # 5 beside the backbone's SE
    assert len(report) == 10 and all(s.path.startswith("backbone.") for s in report) and len(report.attended) == 5
    assert [m.path for m in report.misses] == ["classifier"]
    before = outputs(model, X)
    inject(model, "eca", after="residual", example_input=EXAMPLE, stack=True)
    assert_identity_then_live(model, before)


@pytest.mark.parametrize("position", ["branch_end", "block_output"])
def test_train_only_stochastic_depth_does_not_refuse_the_residuals(position):
    from tests.helpers.graph_models import StochasticDepthNet

    model = look_trained(StochasticDepthNet())
    report = plan(model, "eca", after="residual", position=position, example_input=EXAMPLE)
    assert [s.path for s in report] == ["blocks.0", "blocks.1"] and report.misses == ()
    reference = StochasticDepthNet()
    reference.load_state_dict(model.state_dict())
    inject(model, "eca", after="residual", position=position, example_input=EXAMPLE)
    model.train(), reference.train()
    for block in attention_blocks(model).values():
        block.eval()  # the gate's own mode does not matter; keep batch statistics out of the comparison
    for m in list(model.modules()) + list(reference.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    torch.manual_seed(3)
    expected = outputs(reference, X)
    torch.manual_seed(3)
    assert torch.equal(outputs(model, X), expected)  # the train graph got its blocks, same random draws
    with torch.no_grad():
        for block in attention_blocks(model).values():
            block.conv.weight.fill_(0.5)
    torch.manual_seed(3)
    assert not torch.equal(outputs(model, X), expected)  # and they run in train mode


def test_units_inside_untraceable_modules_are_found_and_patched():
    from tests.helpers.graph_models import TFPaddedMobileNet

    model = look_trained(TFPaddedMobileNet())
    report = plan(model, "eca", after="conv", example_input=EXAMPLE)
    assert [(s.path, s.owner, s.module_name, s.channels) for s in report] == [
        ("conv_stem.convolution", "conv_stem.activation", "conv_stem.activation.eca", 8),
        ("layer.0.convolution", "layer.0.activation", "layer.0.activation.eca", 8),
        ("layer.1.convolution", "layer.1.activation", "layer.1.activation.eca", 16),
        ("layer.2.convolution", "layer.2.activation", "layer.2.activation.eca", 16),
        ("layer.3.convolution", "layer.3.activation", "layer.3.activation.eca", 32),
    ]
    assert len(report.untraced) == 5  # every conv layer runs eagerly, and is still patched
    before = outputs(model, X)
    keys = set(model.state_dict())
    inject(model, "eca", after="conv", example_input=EXAMPLE)
    assert keys < set(model.state_dict())  # the original checkpoint still loads
    assert_identity_then_live(model, before)


def test_an_add_of_a_resized_map_is_a_merge_of_two_resolutions():
    from tests.helpers.graph_models import OneGraphFPN

    model = look_trained(OneGraphFPN())
    report = plan(model, "eca", after="residual", example_input=EXAMPLE)
    assert [s.path for s in report] == ["layer1", "layer2"]
    assert [(m.path, m.reason) for m in report.misses] == [
        (
            "fpn",
            "add add merges maps of two resolutions (one side's last conv gives [1, 8, 16, 16], resized to "
            "[1, 8, 32, 32]): a merge, not a residual",
        )
    ]  # MaskFormer's FPN layers were reported as "map [1, 32, 8, 8] is not NCHW: the branch's last conv ..."
    before = outputs(model, X)
    inject(model, "eca", after="residual", example_input=EXAMPLE)
    assert_identity_then_live(model, before)
