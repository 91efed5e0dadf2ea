"""Recipes carry every kind of rule: block rules, rule-carried block options, after_convN positions
and rules built in Python all save and load back to the same model, bit for bit."""

import torch

from attn_inject import Rule, inject, load, save
from attn_inject.files.arch import create_model
from attn_inject.rules import ConvSpec, resolve_rules
from attn_inject.surgery.recipe import Recipe, recipe_of
from attn_inject.testing import look_trained, move_off_identity

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def round_trip(model, tmp_path):
    assert move_off_identity(model) > 0
    expected = model(X)
    loaded = load(save(model, tmp_path / "m.safetensors"))
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert torch.equal(loaded(X), expected)
    assert recipe_of(loaded).to_json() == recipe_of(model).to_json()
    return loaded


def test_eca_mobilenet_v2_rule_with_kernel_steps_round_trips(tmp_path):
    model = look_trained(create_model("torchvision:mobilenet_v2", num_classes=10))
    before = model(X)
    inject(model, "eca", "inverted_residual_all", example_input=X[:1])
    assert torch.equal(model(X), before)
    loaded = round_trip(model, tmp_path)
    kernels = sorted({m.conv.kernel_size[0] for n, m in loaded.named_modules() if n.endswith(".eca")})
    assert kernels == [1, 3]  # the authors' k: 1 below 96 channels, 3 from 96 up


def test_after_conv_position_and_options_round_trip(tmp_path):
    model = look_trained(create_model("torchvision:resnet18", num_classes=10))
    inject(model, "eca", "basic", position="after_conv1", example_input=X[:1], kernel_size=((1, 3), (256, 5)))
    injection = recipe_of(model).injections[0]
    assert injection.position == "after_conv1" and dict(injection.options) == {"kernel_size": ((1, 3), (256, 5))}
    again = Recipe.from_json(recipe_of(model).to_json())
    assert again.injections[0].options == injection.options
    round_trip(model, tmp_path)


def test_a_block_rule_built_in_python_round_trips(tmp_path):
    convs = (ConvSpec((1, 1), width=frozenset({"expand"}), optional=True), ConvSpec(depthwise=True), ConvSpec((1, 1)))
    rule = Rule(
        "my_blocks",
        "inverted residuals by class",
        "block",
        "block_output",
        convs=convs,
        class_glob="InvertedResidual",
        residual=True,
        options=(("se", (("reduction", 8),)),),
    )
    assert resolve_rules([rule]) == [rule]
    model = look_trained(create_model("torchvision:mobilenet_v2", num_classes=10))
    inject(model, "se", [rule], example_input=X[:1])
    assert len(recipe_of(model).injections[0].modules) == 10  # the blocks with a skip
    round_trip(model, tmp_path)
