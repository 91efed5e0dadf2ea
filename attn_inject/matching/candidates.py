"""Candidates: analysed graphs -> the places a block may go (residual branches, conv units), and
the reasons others are not places; whether a rule's pattern matches one.

* residual: an add of two equal-shape conv maps (NCHW; NCL and NCDHW where a conv of those dims
  gives the map) that fork from one tensor, followed across module
  boundaries (dataflow.py: the branch may start in a parent); an add of maps that do not fork
  from one tensor is a merge (FPN, LR-ASPP), reported as a miss. The branch is the side with more
  learned ops (convs, then norms, then nodes); the other is the shortcut (identity, or a projection
  with fewer convs) and never gets a block. The branch must hold a conv or norm whose channels are
  the map's channel dim (so NHWC and token residuals are reported, not patched); on a 1-D or 3-D
  map, its last conv must give the map exactly (a (B, N, C) token map is 3-D too).
* unit: a conv followed by a norm (and an activation) in one graph, outside any gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from ..blocks.spatial import LAYOUTS
from ..graph.analyze import Analysis, ModuleRecord
from ..graph.dataflow import Fork, Merge, find_fork
from ..graph.folding import has_fold_method
from ..graph.nodes import (
    LearnedOp,
    facts,
    function_op,
    is_activation_node,
    is_add,
    module_kind,
    shape_of,
    target_path,
)
from ..rules.model import ConvSpec, Rule

CandidateKind = Literal["residual", "unit", "block"]


@dataclass(frozen=True, kw_only=True)
class Candidate:
    kind: CandidateKind
    record: ModuleRecord
    path: str  # shown to users and matched by globs: the owner (residual) or the conv (unit)
    node: str  # residual/block: the add (a block without one: its output); unit: the unit's last node
    branch: str  # residual: the add's branch input; unit: same as node
    block_output: str  # residual: last node of add (-> activation) chain; unit: same as node
    branch_arg: int | None  # residual: which argument of the add is the branch
    ops: tuple[LearnedOp, ...]  # residual/block: the branch's (main path's) learned ops; unit: conv (and norm)
    shape: tuple[int, ...]
    has_norm: bool = True
    # the nodes that make the place, for existing attention: residual: the branch (across graphs);
    # unit: conv to the unit's end and what takes its output; block: its main path
    region: tuple[tuple[ModuleRecord, int], ...] = ()

    @property
    def convs(self) -> tuple[LearnedOp, ...]:
        return tuple(op for op in self.ops if op.kind == "conv")

    @property
    def channels(self) -> int:
        return self.shape[1]


@dataclass(frozen=True)
class Miss:
    """A residual add or module that could not be a site, and why."""

    path: str
    reason: str
    attention: str | None = None  # the channel attention the place already holds (skipped without stack=True)


def find_candidates(analysis: Analysis) -> tuple[list[Candidate], list[Miss]]:
    candidates: list[Candidate] = []
    misses: list[Miss] = []
    folding = {id(r.module): r for r in analysis.folding()}
    for record in analysis.records:
        if not record.traced:
            continue
        if record.unit:
            candidates.append(_opaque_unit(record))
            continue
        for node in record.traced_graph.nodes:
            if is_add(node):
                found = _residual(record, node)
                if isinstance(found, Candidate):
                    candidates.append(found)
                elif isinstance(found, Miss):
                    misses.append(found)
            elif (conv := _conv_op(record, node)) is not None:
                unit = _unit(record, node, conv)
                if unit is not None:
                    candidates.append(unit)
            elif node.op == "call_module" and (fold := folding.get(id(_child(record, node)))) is not None:
                unit = _folded_unit(record, node, fold)
                if unit is not None:
                    candidates.append(unit)
    return candidates, misses


def rule_matches(rule: Rule, cand: Candidate) -> bool:
    if rule.kind != cand.kind or not rule.selects(cand.path):
        return False
    if rule.kind == "unit":
        return (cand.has_norm or not rule.norm) and (rule.convs is None or _spec_ok(rule.convs[0], cand.convs[0]))
    return rule.convs is None or pattern_matches(rule.convs, cand.convs)


def pattern_matches(specs: tuple[ConvSpec, ...], convs: tuple[LearnedOp, ...]) -> bool:
    """Whether the convs, in order, fit the specs (an optional spec may match nothing).

    Walks the specs once, keeping the set of conv positions reachable so far: time len(specs) x
    len(convs), whatever a rule file holds (trying each optional spec both ways would take time
    exponential in their number).
    """
    reachable = {0}  # how many convs the specs so far can have consumed
    for spec in specs:
        skipped = reachable if spec.optional else set()
        reachable = skipped | {i + 1 for i in reachable if i < len(convs) and _spec_ok(spec, convs[i])}
        if not reachable:
            return False
    return len(convs) in reachable


def _spec_ok(spec: ConvSpec, op: LearnedOp) -> bool:
    return spec.matches(op.kernel, op.depthwise, op.in_channels, op.channels)


# ---------------------------------------------------------------------------------------------


def _residual(record: ModuleRecord, add: fx.Node) -> Candidate | Miss | None:
    args = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(args) != 2:
        return None
    a, b = args
    shape = shape_of(add)
    if not shape or shape_of(a) != shape or shape_of(b) != shape:
        return None  # broadcasting or non-tensor add: not a residual
    where = record.path or "<model>"
    fork = find_fork(record, a, b)
    if len(shape) != 4 and not (len(shape) - 2 in LAYOUTS and _on_conv_map(fork, shape)):
        nor = f" (nor an {LAYOUTS[len(shape) - 2]} map of a conv)" if len(shape) - 2 in LAYOUTS else ""
        return Miss(where, f"residual {add.name} is on a {len(shape)}-D tensor {list(shape)}, not an NCHW map{nor}")
    if fork is None:
        return None  # not both from the inputs: no residual here
    if isinstance(fork, Merge):
        return Miss(
            where,
            f"add {add.name} merges two maps that do not fork from one tensor (seen in {fork.where}): not a residual",
        )
    sides = []
    for i, side in enumerate((a, b)):
        ops = fork.ops(i)
        convs = sum(o.kind == "conv" for o in ops)
        size = bin(fork.local_bits(i)).count("1")
        sides.append(((convs, sum(o.kind == "norm" for o in ops), size), side, ops))
    resized = _resized(sides[0][2], shape) or _resized(sides[1][2], shape)
    if resized:
        return Miss(where, f"add {add.name} merges maps of two resolutions ({resized}): a merge, not a residual")
    (score_a, _, _), (score_b, _, _) = sides
    if score_a == score_b:
        if score_a[0]:
            return None  # parallel conv branches summed (RepVGG, Inception): not a residual
        return Miss(where, f"residual {add.name}: both inputs look alike, cannot tell branch from shortcut")
    (_, branch, ops), (shortcut_score, _, _) = sorted(sides, key=lambda s: s[0], reverse=True)
    region = fork.sides[(a, b).index(branch)]
    if not fork.followed and shortcut_score[0]:
        return None  # two computed inputs from different arguments of an opaque caller's call
    learned = [o for o in ops if o.kind in ("conv", "norm")]
    if not learned:
        return Miss(where, f"residual {add.name}: the branch has no conv or norm")
    layout = map_problem(learned, shape)
    if layout:
        return Miss(where, f"residual {add.name}: {layout}")
    return Candidate(
        kind="residual",
        record=record,
        path=record.path,
        node=add.name,
        branch=branch.name,
        block_output=_chain_end(record, add).name,
        branch_arg=add.args.index(branch),
        ops=ops,
        shape=shape,
        region=region,
    )


def _on_conv_map(fork: Fork | Merge | None, shape: tuple[int, ...]) -> bool:
    """Whether a residual (an add whose inputs fork) adds a conv's map: a side calls a conv of the
    map's dims (or a module holding one) whose output channels are the map's dim 1."""
    if not isinstance(fork, Fork):
        return False
    for side in fork.sides:
        for record, bits in side:
            for node in record.traced_bits.nodes_in(bits):
                if node.op == "call_module" and any(
                    isinstance(m, _ConvNd) and len(m.kernel_size) == len(shape) - 2 and m.out_channels == shape[1]
                    for m in record.module.get_submodule(target_path(node)).modules()
                ):
                    return True
    return False


def _resized(ops: tuple[LearnedOp, ...], shape: tuple[int, ...]) -> str | None:
    """How a side was resized after its last conv (an FPN's upsampled top-down path), if it was:
    the conv gives the add's channels at another spatial size."""
    convs = [o for o in ops if o.kind == "conv"]
    out = convs[-1].out_shape if convs else None
    if out is None or len(out) != len(shape) or out[1] != shape[1] or tuple(out[2:]) == tuple(shape[2:]):
        return None
    return f"one side's last conv gives {list(out)}, resized to {list(shape)}"


def map_problem(learned: list[LearnedOp] | tuple[LearnedOp, ...], shape: tuple[int, ...]) -> str | None:
    """Why the added map is not a conv map (NCHW, NCL, NCDHW), judged from the branch's last conv
    (or, failing that, norm).

    A conv's output is NCHW, so a 4-D map is NCHW when it has that conv's spatial size (channels may
    differ: GhostNet concatenates and slices); with no conv, the last norm's channels must be dim 1.
    An NHWC map (B, H, W, C) fails both tests (MambaOut, Swin). A 3-D map may be tokens (B, N, C)
    or (T, B, C) beside a Conv1d (Conformer, MobileViT): a 1-D or 3-D map must be exactly the output
    of the branch's last conv, and a norm alone does not tell.
    """
    layout = LAYOUTS.get(len(shape) - 2, "NCHW")
    convs = [o for o in learned if o.kind == "conv"]
    out = convs[-1].out_shape if convs else None
    if out is not None and len(out) == len(shape):
        if tuple(out[2:]) != tuple(shape[2:]) or (len(shape) != 4 and tuple(out) != tuple(shape)):
            return f"map {list(shape)} is not {layout}: the branch's last conv gives {list(out)}"
        return None
    if len(shape) != 4:
        return f"map {list(shape)} is not {layout}: no conv on the branch gives it"
    last = learned[-1]
    if last.channels != shape[1] or (last.out_shape is not None and tuple(last.out_shape) != tuple(shape)):
        return f"map {list(shape)} is not NCHW with the branch's {last.channels} channels"
    return None


def _chain_end(record: ModuleRecord, node: fx.Node, through_identity: bool = False) -> fx.Node:
    """Follow a node through single-use activations (the block output: after add and act); with
    ``through_identity``, also through ``nn.Identity`` modules on the way to one (an empty slot:
    RepVGG's ``attn``, MobileOne's ``se``)."""
    end = node
    while len(node.users) == 1:
        user = next(iter(node.users))
        if shape_of(user) != shape_of(node):
            break
        if is_activation_node(user, record.module.get_submodule):
            end = user
        elif not (through_identity and user.op == "call_module" and type(_child(record, user)) is nn.Identity):
            break
        node = user
    return end


def _has_bias(record: ModuleRecord, conv: fx.Node) -> bool:
    if conv.op == "call_module":
        return getattr(_child(record, conv), "bias", None) is not None
    bias = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
    return bias is not None


def _conv_op(record: ModuleRecord, node: fx.Node) -> LearnedOp | None:
    ops = facts(node).ops
    if len(ops) != 1 or ops[0].kind != "conv":
        return None
    if node.op == "call_module" and module_kind(record.module.get_submodule(target_path(node))) != "conv":
        return None  # a child whose main path is a single conv is a unit in its own graph
    return ops[0]


def _unit(record: ModuleRecord, conv: fx.Node, conv_op: LearnedOp) -> Candidate | None:
    shape = shape_of(conv)
    if not shape or len(shape) - 2 not in LAYOUTS or record.traced_bits.gates >> record.traced_bits.index[conv] & 1:
        return None
    end, norm_op = conv, None
    nxt = _single_user(conv)
    if nxt is not None and _is_norm(record, nxt) and shape_of(nxt) == shape:
        end, norm_op = nxt, next(iter(facts(nxt).ops), None)
    ops = (conv_op, norm_op) if norm_op else (conv_op,)
    if norm_op is None and has_fold_method(record.module) and _has_bias(record, conv):
        # a reparameterized block's conv: its norms are folded into the bias; the unit ends at the
        # activation after it, as the block's output did before the fold (folding.py)
        after = _chain_end(record, end, through_identity=True)
        if after is not end:
            return _unit_candidate(record, after.name, ops, shape, has_norm=True, start=conv)
    return _unit_candidate(record, _chain_end(record, end).name, ops, shape, start=conv)


def _child(record: ModuleRecord, node: fx.Node) -> object:
    return record.module.get_submodule(target_path(node))


def _folded_unit(record: ModuleRecord, call: fx.Node, fold: ModuleRecord) -> Candidate | None:
    """A module that folds its branches into a conv (folding.py), called in ``record``'s graph: one
    conv unit (its norms fold into the conv) ending at its output, or after the activations that
    follow it; the block goes there, in the caller's graph."""
    shape = shape_of(call)
    convs = [op for op in fold.ops if op.kind == "conv" and op.path == fold.path]
    if (
        not shape
        or len(shape) - 2 not in LAYOUTS
        or not convs
        or record.traced_bits.gates >> record.traced_bits.index[call] & 1
    ):
        return None
    return _unit_candidate(record, _chain_end(record, call).name, (convs[0],), shape, has_norm=True, start=call)


def _opaque_unit(record: ModuleRecord) -> Candidate:
    """A unit of an untraceable module, ending in ``record``'s module (analyze.py, opaque_calls.py)."""
    end = record.traced_graph.output_node().args[0]
    assert isinstance(end, fx.Node)  # _unit_record traces the unit's last module, which returns its map
    return _unit_candidate(record, end.name, record.unit, shape_of(end))


def _unit_candidate(
    record: ModuleRecord,
    end: str,
    ops: tuple[LearnedOp, ...],
    shape,
    has_norm: bool | None = None,
    start: fx.Node | None = None,
) -> Candidate:
    """A unit from node ``start`` to node ``end``: its conv (and norm, or one folded into it), placed
    after the unit."""
    bits = record.traced_bits
    last = record.node(end)
    region = 0
    if last is not None:
        region = bits.upto(last) & ~(bits.anc[start] if start is not None else bits.anc[last])
        for user in last.users:
            region |= 1 << bits.index[user]
    return Candidate(
        kind="unit",
        record=record,
        path=ops[0].path,
        node=end,
        branch=end,
        block_output=end,
        branch_arg=None,
        ops=ops,
        shape=shape,
        has_norm=len(ops) > 1 if has_norm is None else has_norm,
        region=((record, region),),
    )


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_norm(record: ModuleRecord, node: fx.Node) -> bool:
    if node.op == "call_module":
        return module_kind(record.module.get_submodule(target_path(node))) == "norm"
    op = function_op(node, record.path, shape_of(node), lambda _: None)
    return op is not None and op.kind == "norm"
