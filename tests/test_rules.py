import pytest

from attn_inject import AttnInjectError, list_rules
from attn_inject.rules import ConvSpec, resolve_rules
from tests.helpers.rules import BUILTIN_RULES


def test_builtin_rules_load_with_descriptions():
    rules = list_rules()
    assert [r.name for r in rules] == BUILTIN_RULES
    assert all(r.description for r in rules)
    assert {r.name: r.insert for r in rules} == {
        "basic": "branch_end",
        "bottleneck": "branch_end",
        "conv": "unit_output",
        "inception": "block_output",
        "inverted_residual": "branch_end",
        "inverted_residual_all": "branch_end",
        "mbconv_se": "after_conv-2",
        "mmcv_after_conv2": "after_conv2",
        "mobilenetv3_se": "after_conv-2",
        "regnet_se": "after_conv2",
        "residual": "branch_end",
    }
    bottleneck = resolve_rules("bottleneck")[0]
    assert bottleneck.convs == (ConvSpec(1), ConvSpec(None, False), ConvSpec(1))  # an int: every spatial dim


def test_after_accepts_names_paths_and_lists(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmatch: {kind: residual}\ninsert: block_output\ninclude: 'layer4.*'\n")
    rules = resolve_rules(["bottleneck", str(path)])
    assert [r.name for r in rules] == ["bottleneck", "mine"]
    assert rules[1].insert == "block_output" and rules[1].include == ("layer4.*",)
    assert rules[1].selects("layer4.0") and not rules[1].selects("layer3.0")
    assert [r.name for r in resolve_rules(path)] == ["mine"]


def test_a_file_can_hold_a_list_of_rules(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("- name: a\n  match: {kind: residual}\n- name: b\n  match: {kind: unit, norm: false}\n")
    assert [(r.name, r.kind, r.norm) for r in resolve_rules(str(path))] == [
        ("a", "residual", True),
        ("b", "unit", False),
    ]


def test_unknown_rule_names_the_valid_ones():
    with pytest.raises(
        AttnInjectError,
        match=(
            r"unknown rule 'bottlenek'.*Valid built-in rules: basic, bottleneck, conv, inception,"
            r" inverted_residual, inverted_residual_all, mbconv_se, mmcv_after_conv2, mobilenetv3_se, regnet_se,"
            r" residual"
        ),
    ):
        resolve_rules("bottlenek")
    with pytest.raises(AttnInjectError, match=r"rule 'basic' is given more than once"):
        resolve_rules(["basic", "basic"])
    with pytest.raises(AttnInjectError, match=r"after= is empty"):
        resolve_rules([])


BROKEN = [
    (
        "name: x\nmatch:\n  kind: residual\n  convs:\n    - {kernel: big}\n",
        r"bad\.yaml:5: rule 'x': field 'match\.convs\[0\]\.kernel' must be a positive int, a \[h, w\] pair or"
        r" 'any', not 'big'",
    ),
    (
        "name: x\nmatch:\n  kind: residual\ninsert: after_add\n",
        r"bad\.yaml:4: rule 'x': field 'insert' must be one of branch_end, block_output, after_convN for a residual"
        r" rule, not 'after_add'",
    ),
    (
        "name: x\nmatch:\n  kind: residual\n  convs:\n    - kernel: 1\n      groups: 2\n",
        r"bad\.yaml:6: rule 'x': field 'match\.convs\[0\]\.groups' is not a known field; expected one of: kernel,"
        r" depthwise, width, optional",
    ),
    (
        "name: x\nmatch:\n  kind: loop\n",
        r"bad\.yaml:3: rule 'x': field 'match\.kind' must be one of residual, unit, block, not 'loop'",
    ),
    ("match:\n  kind: residual\n", r"bad\.yaml:1: missing field 'name'"),
    ("name: x\n", r"bad\.yaml:1: rule 'x': missing field 'match'"),
    (
        "name: x\nmatch: {kind: unit, norm: maybe}\n",
        r"bad\.yaml:2: rule 'x': field 'match\.norm' must be a bool, not 'maybe'",
    ),
    (
        "name: x\nmatch:\n  convs: [1, 3]\n",
        r"bad\.yaml:3: rule 'x': field 'match\.convs\[0\]' must be a mapping such as \{kernel: 1\}, not 1",
    ),
    ("name: x\nmatch: {kind: residual}\nextra: 1\n", r"bad\.yaml:3: rule 'x': field 'extra' is not a known field"),
    ("name: x\nmatch: [1\n", r"bad\.yaml:3: not valid YAML"),
    ("- 1\n- 2\n", r"bad\.yaml:1: a rule file holds one rule"),
    ("name: 9x\nmatch: {}\n", r"bad\.yaml:1: field 'name' must start with a letter"),
    (
        "name: x\nmatch:\n  convs:\n    - {width: wider}\n",
        r"bad\.yaml:4: rule 'x': field 'match\.convs\[0\]\.width' must be 'any' or one or more of expand, reduce, same",
    ),
]


@pytest.mark.parametrize("text,message", BROKEN)
def test_broken_rule_files_name_file_line_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(AttnInjectError, match=message):
        resolve_rules(str(path))


def test_missing_rule_file():
    with pytest.raises(AttnInjectError, match=r"nope\.yaml: cannot read rule file"):
        resolve_rules("nope.yaml")


def test_position_override_is_checked():
    rule = resolve_rules("conv")[0]
    with pytest.raises(AttnInjectError, match=r"position 'branch_end' does not apply to rule 'conv' \(kind unit\)"):
        rule.with_position("branch_end")
    assert resolve_rules("basic")[0].with_position("block_output").insert == "block_output"
