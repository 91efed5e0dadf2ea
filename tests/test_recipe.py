"""The recipe: remembered by inject (composing), JSON round trip, strict checks of a recipe read from a file."""

import dataclasses
import json

import pytest
import timm
import torch

from attn_inject import AttnInjectError, Rule, inject, list_rules
from attn_inject.rules import ConvSpec
from attn_inject.rules.documents import rule_document, rule_from_yaml, rule_to_yaml
from attn_inject.surgery.recipe import FORMAT_VERSION, Injection, Recipe, recipe_of, set_recipe


def resnet18_patched_twice():
    model = timm.create_model("resnet18").eval()
    x = torch.randn(1, 3, 64, 64)
    inject(model, "eca", "basic", example_input=x)
    inject(model, "se", "residual", position="block_output", include="layer4.*", example_input=x, reduction=8)
    return model


def test_inject_remembers_the_recipe_and_composes():
    recipe = recipe_of(resnet18_patched_twice())
    assert recipe.arch == "resnet18" and recipe.num_classes == 1000  # timm's pretrained_cfg names the arch
    first, second = recipe.injections
    assert first.block == "eca" and [r.name for r in first.rules] == ["basic"] and first.position is None
    assert first.input_shapes == ((1, 3, 64, 64),) and len(first.modules) == 8
    assert second.block == "se" and second.options == (("reduction", 8),) and second.position == "block_output"
    assert second.include == ("layer4.*",) and second.modules == ("layer4.0.se_out", "layer4.1.se_out")
    assert recipe.modules == first.modules + second.modules
    assert dataclasses.replace(recipe, num_classes=10).num_classes == 10


def test_json_round_trip():
    recipe = recipe_of(resnet18_patched_twice())
    text = recipe.to_json()
    data = json.loads(text)
    assert data["format_version"] == FORMAT_VERSION and set(data["versions"]) == {"attn_inject", "torch", "timm"}
    assert data["injections"][0]["rules"][0].startswith("name: basic\n")  # the rule's full YAML
    again = Recipe.from_json(text)
    assert again.to_json() == text
    assert [r.name for r in again.injections[1].rules] == ["residual"]
    assert again.injections[1].rules[0].insert == "block_output"  # the position override travels too
    assert dict(again.versions)["torch"] == torch.__version__


def test_stack_travels_and_a_recipe_from_before_reads_as_stacked():
    """Files written before places with the model's own attention were skipped placed blocks there:
    replayed with stack=True, they land where they did."""
    data = json.loads(recipe_of(resnet18_patched_twice()).to_json())
    assert [inj["stack"] for inj in data["injections"]] == [False, False]
    assert "input_kwargs" not in data["injections"][0]  # written only when the example had keywords
    assert [inj.stack for inj in Recipe.from_json(json.dumps(data)).injections] == [False, False]
    for inj in data["injections"]:
        del inj["stack"]
    assert [inj.stack for inj in Recipe.from_json(json.dumps(data)).injections] == [True, True]


@pytest.mark.parametrize("rule", list_rules(), ids=lambda r: r.name)
def test_every_builtin_rule_round_trips_through_the_schema(rule):

    text = rule_to_yaml(rule)
    assert dataclasses.replace(rule_from_yaml(text, "x"), source=rule.source) == rule
    built_in_python = dataclasses.replace(rule, document=None)  # the generic dump, as for a Rule built in Python
    text = rule_to_yaml(built_in_python)
    assert dataclasses.replace(rule_from_yaml(text, "x"), source=rule.source) == rule
    assert rule_document(rule)["name"] == rule.name


def test_a_rule_built_in_python_travels_as_yaml():
    rule = Rule(
        "late",
        "late convs",
        "residual",
        "branch_end",
        (ConvSpec((1, 1), None, frozenset({"expand"}), True), ConvSpec(None, True)),
        include=("layer4.*",),
    )
    text = rule_to_yaml(rule)
    assert "optional: true" in text and "layer4.*" in text

    assert dataclasses.replace(rule_from_yaml(text, "x"), source=rule.source) == rule


def good() -> dict:
    return json.loads(
        Recipe("resnet18", None, (Injection("eca", tuple(r for r in list_rules() if r.name == "basic")),)).to_json()
    )


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: "not json", r"f\.safetensors: recipe: the recipe is not valid JSON"),
        (lambda d: [], r"recipe must be a JSON object, not list"),
        (
            lambda d: {**d, "format_version": FORMAT_VERSION + 1},
            r"the recipe has format version 2, newer than this attn_inject reads \(1\)\. Upgrade attn_inject",
        ),
        (lambda d: {**d, "extra": 1}, r"recipe field 'recipe\.extra' is not a known field"),
        (
            lambda d: {k: v for k, v in d.items() if k != "format_version"},
            r"recipe field 'recipe\.format_version' is missing",
        ),
        (lambda d: {**d, "arch": 5}, r"recipe field 'recipe\.arch' must be str or null, not 5"),
        (
            lambda d: {**d, "injections": [{**d["injections"][0], "block": "bam"}]},
            r"unknown block 'bam'. Valid blocks: cbam, coord, eca, gc, gct, ge, se, simam",
        ),
        (
            lambda d: {**d, "injections": [{**d["injections"][0], "options": {"ratio": 2}}]},
            r"block 'eca' has no option 'ratio'",
        ),
        (
            lambda d: {**d, "injections": [{**d["injections"][0], "rules": ["name: x\nmatch: {kind: blob}\n"]}]},
            r"injections\[0\]\.rules\[0\]:2: rule 'x': field 'match\.kind' must be one of residual, unit, block,"
            r" not 'blob'",
        ),
        (
            lambda d: {**d, "injections": [{**d["injections"][0], "rules": []}]},
            r"'injections\[0\]\.rules' must hold at least one rule",
        ),
        (
            lambda d: {**d, "injections": [{**d["injections"][0], "input_shapes": [[1, -3]]}]},
            r"'injections\[0\]\.input_shapes' must be a list of shapes",
        ),
        (
            lambda d: {**d, "injections": [{**d["injections"][0], "input_kwargs": {"pixel_values": [1, 0]}}]},
            r"'injections\[0\]\.input_kwargs' must map argument names to shapes",
        ),
        (
            lambda d: {**d, "injections": [{**d["injections"][0], "input_kwargs": [[1, 3]]}]},
            r"'injections\[0\]\.input_kwargs' must be dict",
        ),
        (
            lambda d: {**d, "injections": [{**d["injections"][0], "position": "middle"}]},
            r"'injections\[0\]\.position' must be null or a position its rules take, not 'middle'",
        ),
    ],
)
def test_a_bad_recipe_is_refused_clearly(change, message):
    data = change(good())
    with pytest.raises(AttnInjectError, match=message):
        Recipe.from_json(data if isinstance(data, str) else json.dumps(data), where="f.safetensors: recipe")


def test_set_recipe_and_nothing_remembered_on_a_fresh_model():
    model = torch.nn.Conv2d(3, 3, 1)
    assert recipe_of(model) is None
    set_recipe(model, Recipe("x"))
    assert recipe_of(model) == Recipe("x")
    set_recipe(model, None)
    assert recipe_of(model) is None


def test_options_that_cannot_be_written_are_refused_at_save_time():
    recipe = Recipe("resnet18", None, (Injection("se", (), (("reduction", object()),)),))
    with pytest.raises(
        AttnInjectError, match=r"block option reduction=<object object at .*> cannot be written into a recipe"
    ):
        recipe.to_json()
