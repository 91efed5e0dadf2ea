"""Rule files and Rule objects from untrusted hands: bounded, strict, one AttnInjectError each."""

import os
import time

import pytest

from attn_inject import AttnInjectError
from attn_inject.graph.nodes import LearnedOp
from attn_inject.matching.candidates import pattern_matches
from attn_inject.rules import ConvSpec, Rule, resolve_rules
from attn_inject.rules.located_yaml import MAX_BYTES, MAX_DEPTH
from tests.helpers.limits import time_limit

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)  # 9 ** 9 = 387 million strings once expanded, in under 1 kB


def write(tmp_path, content: str | bytes, name: str = "rule.yaml"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def test_billion_laughs_is_refused_at_the_first_anchor_fast(tmp_path):
    path = write(tmp_path, LAUGHS)
    assert len(LAUGHS) < 1000
    start = time.perf_counter()
    with pytest.raises(
        AttnInjectError, match=r"rule\.yaml:1: anchors and aliases \(&name, \*name\) are not allowed in rule files"
    ):
        resolve_rules(path)
    assert time.perf_counter() - start < 0.5


def test_deep_nesting_is_refused_with_its_line(tmp_path):
    deep = "name: deep\nmatch:\n  kind: residual\ninclude: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(AttnInjectError, match=rf"rule\.yaml:4: nested more than {MAX_DEPTH} levels deep"):
        resolve_rules(write(tmp_path, deep))


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = write(tmp_path, b"name: x\nmatch: {kind: residual}\ndescription: caf\xe9\n")
    with pytest.raises(AttnInjectError, match=r"rule\.yaml:3: not UTF-8 text \(byte 0xe9 at offset 48\)"):
        resolve_rules(path)


def test_oversized_file_is_refused_before_it_is_read(tmp_path):
    path = write(tmp_path, "# " + "x" * MAX_BYTES + "\nname: big\nmatch: {kind: residual}\n")
    with pytest.raises(AttnInjectError, match=r"rule\.yaml: rule file is 65,573 bytes; rule files are at most 65,536"):
        resolve_rules(path)


def test_yaml_kernel_pair_with_a_bool_is_refused(tmp_path):
    path = write(tmp_path, "name: k\nmatch:\n  kind: residual\n  convs:\n    - {kernel: [3, true]}\n")
    with pytest.raises(
        AttnInjectError,
        match=(
            r"rule\.yaml:5: rule 'k': field 'match\.convs\[0\]\.kernel' must be a positive int, a \[h, w\] pair or"
            r" 'any', not \[3, True\]"
        ),
    ):
        resolve_rules(path)


@pytest.mark.parametrize(
    "after,message",
    [
        (
            None,
            r"after= must be a rule name, a YAML rule file, a Rule or a list of these, not None.*Valid built-in"
            r" rules: basic, bottleneck",
        ),
        (42, r"after= must be .* not 42"),
        ([1], r"after= must be .* not \[1\]"),
        (Rule("r", "", "blob", "branch_end"), r"Rule 'r': kind='blob' is not valid\. Valid: residual, unit, block\."),
        (
            Rule("r", "", "residual", "unit_output"),
            r"Rule 'r': insert='unit_output' is not valid\. Valid: branch_end, block_output, after_convN for a"
            r" residual rule\.",
        ),
        (
            Rule("r", "", "residual", "branch_end", convs=(ConvSpec((3, True)),)),
            r"ConvSpec\.kernel=\(3, True\) is not valid",
        ),
        (
            Rule("r", "", "residual", "branch_end", include="layer*"),
            r"include='layer\*' is not valid\. Valid: a tuple of glob strings",
        ),
        (Rule(3, "", "residual", "branch_end"), r"Rule 3: name=3 is not valid"),
    ],
)
def test_bad_after_and_rules_built_in_python(after, message):
    with pytest.raises(AttnInjectError, match=message):
        resolve_rules(after)


def test_a_rule_file_that_is_a_device_or_a_fifo_is_refused_before_it_is_read(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.yaml")  # st_size 0: a size check alone would read forever
    os.mkfifo(tmp_path / "fifo.yaml")  # opening it for reading would wait for a writer
    with pytest.raises(
        AttnInjectError, match=r"zero\.yaml: rule file is not a regular file \(it is a character device\)"
    ):
        resolve_rules(str(tmp_path / "zero.yaml"))
    with pytest.raises(AttnInjectError, match=r"fifo\.yaml: rule file is not a regular file \(it is a FIFO\)"):
        resolve_rules(str(tmp_path / "fifo.yaml"))


def test_many_optional_convs_match_in_linear_time():
    """A rule of 2,000 optional conv specs against a 3-conv branch: trying each optional spec both
    ways would take C(2003, 3) ~ 1.3e9 steps; the matcher walks the specs once."""
    specs = (ConvSpec(optional=True),) * 2000 + (ConvSpec((7, 7)),)
    convs = tuple(LearnedOp("conv", f"c{i}", 8, None, in_channels=8, kernel=(3, 3)) for i in range(3))
    with time_limit(10):
        assert not pattern_matches(specs, convs)
        assert pattern_matches(specs[:-1], convs)
