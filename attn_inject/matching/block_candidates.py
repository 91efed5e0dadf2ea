"""Block candidates (whole modules) and the places a rule puts a block, ``after_convN`` included.

* block: a traced module whose output is a conv map and whose main path holds convs (NCHW; NCL or
  NCDHW when its last conv gives exactly that map). If the
  module ends in a residual add (the add, then activations, give its output), its convs are the
  branch's and ``branch_end`` is before that add; otherwise ``branch_end`` is its output. Nested
  modules with the very same convs (torchvision's InvertedResidual around its ``conv``
  Sequential, a one-block stage around its block) are one block: the outermost module that is
  not a plain container is kept.
* after_convN: the N-th conv of the matched branch or block (1-based; negative counts from the
  end), as the conv unit (conv -> norm -> act) found in the graph of the module that holds it,
  which may be a child (torchvision wraps convs in Conv2dNormActivation).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict

from torch import fx, nn

from ..blocks.spatial import LAYOUTS
from ..errors import AttnInjectError
from ..graph.analyze import Analysis
from ..graph.nodes import shape_of
from ..rules.model import Rule, conv_index
from .candidates import Candidate, Miss, map_problem, pattern_matches, rule_matches


def find_block_candidates(analysis: Analysis, candidates: list[Candidate]) -> list[Candidate]:
    """One block candidate per traced module (and call pattern) that outputs a conv map."""
    residual_at = {(id(c.record), c.block_output): c for c in candidates if c.kind == "residual"}
    blocks = []
    for record in analysis.traced():
        out = _output_node(record.traced_graph)
        shape = shape_of(out) if out is not None else None
        if out is None or shape is None:
            continue
        residual = residual_at.get((id(record), out.name))
        ops = residual.ops if residual is not None else record.ops
        if not any(op.kind == "conv" for op in ops) or (len(shape) != 4 and map_problem(ops, shape)):
            continue
        if residual is not None:
            node, branch, branch_arg, region = residual.node, residual.branch, residual.branch_arg, residual.region
        else:
            node, branch, branch_arg = out.name, out.name, None
            region = ((record, record.traced_bits.upto(out)),)
        blocks.append(
            Candidate(
                kind="block",
                record=record,
                path=record.path,
                node=node,
                branch=branch,
                block_output=out.name,
                branch_arg=branch_arg,
                ops=ops,
                shape=shape,
                region=region,
            )
        )
    return blocks


def _output_node(graph: fx.Graph) -> fx.Node | None:
    """The node whose value the graph returns, if it is one (B, C, *spatial) tensor computed in the graph."""
    output = next(iter(graph.find_nodes(op="output")), None)
    value = output.args[0] if output is not None and output.args else None
    if not isinstance(value, fx.Node) or value.op == "placeholder":
        return None
    shape = shape_of(value)
    return value if shape and len(shape) - 2 in LAYOUTS else None


def block_matches(rule: Rule, cand: Candidate) -> bool:
    if rule.kind != "block" or cand.kind != "block" or not rule.selects(cand.path):
        return False
    if rule.class_glob is not None and not fnmatch.fnmatchcase(type(cand.record.module).__name__, rule.class_glob):
        return False
    if rule.residual is not None and rule.residual != (cand.branch_arg is not None):
        return False
    return rule.convs is None or pattern_matches(rule.convs, cand.convs)


def matched(rule: Rule, candidates: list[Candidate], blocks: list[Candidate]) -> list[Candidate]:
    """The candidates ``rule`` matches; for block rules, one module per set of convs."""
    if rule.kind != "block":
        return [c for c in candidates if rule_matches(rule, c)]
    found = [c for c in blocks if block_matches(rule, c)]
    groups: dict[tuple[str, ...], list[Candidate]] = defaultdict(list)
    for cand in found:
        groups[tuple(op.path for op in cand.convs)].append(cand)
    keep = set()
    for group in groups.values():
        best = min(group, key=lambda c: (isinstance(c.record.module, nn.Sequential), _depth(c.path)))
        keep.add(id(best.record.module))
    return [c for c in found if id(c.record.module) in keep]


def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def units_by_conv(candidates: list[Candidate]) -> dict[str, list[Candidate]]:
    """Conv-unit candidates keyed by their conv's path."""
    units: dict[str, list[Candidate]] = defaultdict(list)
    for cand in candidates:
        if cand.kind == "unit":
            units[cand.ops[0].path].append(cand)
    return units


def places(rule: Rule, cand: Candidate, units: dict[str, list[Candidate]]) -> tuple[str, list[Candidate]] | Miss:
    """Where ``rule`` puts a block for a matched candidate: (position, candidates giving the anchor).

    For ``after_convN`` that is the unit of the N-th conv (``after_conv-1`` resolves to the number
    counted from the start); a missing N is an error naming the rule and the block.
    """
    n = conv_index(rule.insert)
    if n is None:
        return rule.insert, [cand]
    convs = cand.convs
    index = n - 1 if n > 0 else len(convs) + n
    if not 0 <= index < len(convs):
        where = "on its residual branch" if cand.branch_arg is not None else "on its main path"
        raise AttnInjectError(
            f"rule {rule.name!r}: {cand.path or '<model>'} ({type(cand.record.module).__name__}) has "
            f"{len(convs)} conv(s) {where}, so {rule.insert} does not exist",
            hint=f"Use after_conv1 .. after_conv{len(convs)} (or -1 .. -{len(convs)} from the end), "
            "or narrow the rule with convs:, class: or include:.",
        )
    conv = convs[index]
    found = units.get(conv.path, [])
    if not found:
        return Miss(cand.path or "<model>", f"conv {index + 1} ({conv.path}) is not a conv unit in a traced graph")
    return f"after_conv{index + 1}", found
