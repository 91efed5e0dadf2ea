"""The plan: frozen records of every splice (Site, Plan), built and checked before anything is changed.

A Site says where one block goes (module, rule, position, channels), what it is called and how
many parameters it adds. Candidates claimed by an earlier rule in ``after=`` are not claimed again
at the same place. Every check that can fail (names, options, train-mode graphs) runs here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, Literal, cast, get_args

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..blocks import block_spec, get_block
from ..blocks.spatial import LAYOUTS
from ..errors import AttnInjectError, one_line
from ..graph.align import same_source
from ..graph.analyze import Analysis, ModuleRecord
from ..graph.nodes import join_path
from ..rules.builtin import list_rules
from ..rules.model import Rule, conv_index, frozen, glob_selects
from .attended import Attended
from .block_candidates import find_block_candidates, matched, places, units_by_conv
from .candidates import Candidate, Miss, find_candidates, rule_matches
from .names import Names


@dataclass(frozen=True, kw_only=True)
class Site:
    """One block to splice in."""

    path: str  # the block (residual) or conv (unit) it belongs to; "" is the model itself
    rule: str
    position: str  # branch_end | block_output | unit_output | after_convN (N from 1)
    owner: str  # module whose forward is edited
    name: str  # the new submodule's name inside ``owner``
    channels: int
    shape: tuple[int, ...]  # the feature map at the site, for the example input
    params: int
    flops: int  # the block's FLOPs per image at that shape, as torch's FlopCounterMode counts them
    anchor: str  # graph node whose value the block takes (in the eval-mode graph)
    consumer: str | None  # branch_end: the add that takes the block's output; else every user
    consumer_arg: int | None = None  # branch_end: which argument of the add is the branch
    where: str = ""  # the position in words: "branch end (before the add)", "after conv2 unit", ...
    options: tuple[tuple[str, Any], ...] = ()  # the block's options here: the rule's, the caller's, the site's

    @property
    def module_name(self) -> str:
        """Qualified name of the new submodule (the prefix of its state_dict keys)."""
        return join_path(self.owner, self.name)

    @property
    def spatial_dims(self) -> int:
        """The map's spatial axes, the ones the block pools over: 1 (NCL), 2 (NCHW) or 3 (NCDHW)."""
        return len(self.shape) - 2

    @property
    def map_words(self) -> str:
        """The map at the site, channels then the pooled dims: ``64x4x16x16 NCDHW``."""
        return f"{'x'.join(map(str, self.shape[1:]))} {LAYOUTS.get(self.spatial_dims, '?')}"

    def __str__(self) -> str:
        on = "" if self.spatial_dims == 2 else f" on a {self.spatial_dims}-D map {self.map_words}"
        return (
            f"{self.path or '<model>'}: {self.rule} at {self.where or self.position}, {self.channels} channels{on}, "
            f"+{self.params} params, +{self.flops} FLOPs as {self.module_name}"
        )


Note = Literal["misses", "attended", "folded", "unreached", "untraced"]  # what Plan.note tells, in this order


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What ``inject`` would do; iterate it for the sites."""

    model_class: str
    block: str
    options: tuple[tuple[str, Any], ...]
    rules: tuple[Rule, ...]
    sites: tuple[Site, ...]
    params_before: int
    misses: tuple[Miss, ...] = ()
    untraced: tuple[tuple[str, str], ...] = ()  # (module path, reason) of modules fx could not trace
    unreached: tuple[str, ...] = ()  # modules with convs the example forward did not reach (or could not see)
    attended: tuple[tuple[str, str], ...] = ()  # (place, its attention) matched places already holding one
    stacked: bool = False  # the attended places got a block all the same (stack=True)
    folded: tuple[tuple[str, str], ...] = ()  # (module path, method) of modules that fold their branches
    real_values: str | None = None  # why the analysis ran on real tensors; None: on shapes only (graph/shapes.py)
    analysis: Analysis | None = field(default=None, repr=False, compare=False)
    site_records: tuple[tuple[Site, tuple[ModuleRecord, ...]], ...] = field(default=(), repr=False, compare=False)

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    @property
    def params_added(self) -> int:
        return sum(s.params for s in self.sites)

    @property
    def flops_added(self) -> int:
        """FLOPs the blocks add per image at the example size (torch's FlopCounterMode: 2 per MAC)."""
        return sum(s.flops for s in self.sites)

    @property
    def params_after(self) -> int:
        return self.params_before + self.params_added

    @property
    def percent_added(self) -> float:
        return 100.0 * self.params_added / self.params_before if self.params_before else 0.0

    def note(self, about: Note) -> str | None:
        """What the plan left out or treated specially, in words: unusable adds, places that already
        hold channel attention, modules that fold their branches, unreached modules, untraced ones."""
        misses = [m for m in self.misses if m.attention is None]
        if about == "misses" and misses:
            first = misses[0]
            return f"{len(misses)} residual add(s) were not usable (e.g. {first.path}: {first.reason})"
        if about == "attended" and self.attended:
            path, found = self.attended[0]
            done = "a block was stacked on each (stack=True)" if self.stacked else "skipped (stack=True adds another)"
            return (
                f"{len(self.attended)} place(s) already hold channel attention (e.g. {path or '<model>'}: {found}): "
                f"{done}"
            )
        if about == "folded" and self.folded:
            path, method = self.folded[0]
            return (
                f"{len(self.folded)} module(s) fold their branches into one conv (e.g. {path}: {method}()): each is "
                "one unit, a block goes after it, never inside a branch"
            )
        if about == "unreached" and self.unreached:
            more = ", ..." if len(self.unreached) > 3 else ""
            return (
                f"{len(self.unreached)} module(s) with convolutions were not reached by the example forward "
                f"({', '.join(self.unreached[:3])}{more})"
            )
        if about == "untraced" and self.untraced:
            path, reason = self.untraced[0]
            return f"{len(self.untraced)} module(s) could not be traced by torch.fx (e.g. {path}: {reason})"
        return None

    def notes(self) -> list[str]:
        return [n for about in get_args(Note) if (n := self.note(about)) is not None]

    def summary(self) -> dict[str, Any]:
        """Totals and sites as plain data (what ``--json`` prints)."""
        return {
            "model": self.model_class,
            "block": self.block,
            "options": dict(self.options),
            "rules": [r.name for r in self.rules],
            "sites": [
                {
                    "path": s.path,
                    "rule": s.rule,
                    "position": s.position,
                    "where": s.where,
                    "channels": s.channels,
                    "map": s.map_words,
                    "params": s.params,
                    "flops": s.flops,
                    "module": s.module_name,
                    "options": dict(s.options),
                }
                for s in self.sites
            ],
            "params_before": self.params_before,
            "params_added": self.params_added,
            "params_after": self.params_after,
            "percent_added": round(self.percent_added, 4),
            "flops_added": self.flops_added,
            "untraced": [{"path": p, "reason": r} for p, r in self.untraced],
            "unreached": list(self.unreached),
            "existing_attention": len(self.attended),
            "attended": [{"path": p, "attention": a} for p, a in self.attended],
            "stacked": self.stacked,
            "folded": [{"path": p, "method": m} for p, m in self.folded],
            "shapes_only": self.real_values is None,
            "real_values": self.real_values,
        }


def build_plan(
    analysis: Analysis,
    block: str,
    options: dict[str, Any],
    rules: list[Rule],
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    stack: bool = False,
) -> Plan:
    """Match ``rules`` on an analysed model and lay out the sites; raises if nothing matches.
    A place that already holds channel attention is skipped (a miss) unless ``stack``."""
    candidates, misses = find_candidates(analysis)
    blocks = find_block_candidates(analysis, candidates)
    units = units_by_conv(candidates)
    claimed: dict[tuple, Site] = {}
    records_of: dict[tuple, list[ModuleRecord]] = {}
    names = Names(block_spec(block))
    existing, attended = Attended(analysis), dict[str, str]()
    for rule in rules:
        for matched_cand in matched(rule, candidates, blocks):
            if not glob_selects(matched_cand.path, include, exclude):
                continue
            found = existing.at(matched_cand)
            if found is not None:
                attended.setdefault(matched_cand.path, found)
                if not stack:
                    misses.append(
                        Miss(
                            matched_cand.path or "<model>",
                            f"already holds channel attention ({found}); stack=True adds another",
                            attention=found,
                        )
                    )
                    continue
            placed = places(rule, matched_cand, units)
            if isinstance(placed, Miss):
                misses.append(placed)
                continue
            position, at = placed
            for cand in at:
                anchor, consumer, consumer_arg = _anchor(position, cand)
                key = (id(cand.record.module), consumer is not None, anchor)  # one block per place
                if key in claimed:
                    if cand.record not in records_of[key] and claimed[key].rule == rule.name:
                        records_of[key].append(cand.record)  # the same place, reached with other arguments
                    continue
                problem = _train_mode_problem(cand.record, anchor, consumer, consumer_arg)
                if problem:
                    misses.append(Miss(cand.path or "<model>", problem))
                    continue
                site_options = _site_options(block, {**rule.options_for(block), **options}, matched_cand, cand)
                params, flops = _site_cost(block, site_options, cand, rule, matched_cand.path)
                name = names.claim(cand.record, "unit_output" if cand is not matched_cand else position, cand)
                claimed[key] = Site(
                    path=matched_cand.path,
                    rule=rule.name,
                    position=position,
                    owner=cand.record.path,
                    name=name,
                    channels=cand.channels,
                    shape=cand.shape,
                    params=params,
                    flops=flops,
                    anchor=anchor,
                    consumer=consumer,
                    consumer_arg=consumer_arg,
                    where=position_words(position, matched_cand),
                    options=site_options,
                )
                records_of[key] = [cand.record]
    sites = tuple(claimed.values())
    plan = Plan(
        model_class=type(analysis.model).__name__,
        block=block,
        options=tuple(sorted(options.items())),
        rules=tuple(rules),
        sites=sites,
        params_before=sum(p.numel() for p in analysis.model.parameters()),
        misses=tuple(misses),
        untraced=tuple((r.path or "<model>", r.reason or "") for r in analysis.untraced()),
        unreached=tuple(analysis.unreached()),
        attended=tuple(attended.items()),
        stacked=stack,
        folded=tuple((r.path, r.folds or "") for r in analysis.folding()),
        analysis=analysis,
        site_records=tuple((claimed[k], tuple(records_of[k])) for k in claimed),
    )
    if not sites:
        raise AttnInjectError(_nothing_matched(plan, candidates, include, exclude))
    return plan


def _anchor(position: str, cand: Candidate) -> tuple[str, str | None, int | None]:
    if position == "branch_end" and cand.branch_arg is not None:
        return cand.branch, cand.node, cand.branch_arg
    if position in ("block_output", "branch_end"):  # a block without an add: its output
        return cand.block_output, None, None
    return cand.node, None, None


def position_words(position: str, cand: Candidate) -> str:
    """A site's position as users name it: "branch end (before the add)", "after conv2 unit", ..."""
    n = conv_index(position)
    if n is not None:
        return f"after conv{n} unit"
    has_add = cand.branch_arg is not None
    if position == "branch_end":
        return "branch end (before the add)" if has_add else "block output (no add)"
    if position == "block_output":
        return "block output (after the add)" if has_add else "block output"
    return "after conv unit"


def _site_options(block: str, options: dict[str, Any], matched_cand: Candidate, cand: Candidate) -> tuple:
    """The block's options at one site, with the site facts its spec takes: ``block_in_channels``,
    the channels entering the matched branch or block (its first conv's input), and
    ``spatial_dims``, the map's spatial axes (left at the block's default 2 on 2-D maps, so 2-D
    sites read as before). A 2-D-only block at a 1-D/3-D map is refused here, before any change."""
    spec, dims = block_spec(block), len(cand.shape) - 2
    if dims != 2 and "spatial_dims" not in spec.site_facts:
        raise AttnInjectError(
            f"block {block!r} ({spec.cls.__name__}) serves 2-D maps only, and this site is on a {dims}-D map "
            f"{list(cand.shape)} ({LAYOUTS.get(dims, 'not a conv map')})",
            where=cand.path or "<model>",
            hint="A block serves 1-D and 3-D maps when its __init__ takes spatial_dims: int = 2 "
            "(attn_inject.blocks.registry); use such a block (se, eca), or exclude= these modules.",
        )
    facts = {
        "block_in_channels": lambda: matched_cand.convs[0].in_channels if matched_cand.convs else cand.channels,
        "spatial_dims": lambda: dims,
    }
    options = {**options, **{fact: facts[fact]() for fact in spec.site_facts}}
    if dims == 2:
        options.pop("spatial_dims", None)
    return tuple(sorted((k, frozen(v)) for k, v in options.items()))


def _site_cost(block: str, site_options: tuple, cand: Candidate, rule: Rule, path: str) -> tuple[int, int]:
    try:
        return _block_cost(block, cast(Hashable, get_block(block)), site_options)(cand.shape[1:])
    except AttnInjectError as exc:
        raise AttnInjectError(f"rule {rule.name!r}: {exc.what}", where=path or "<model>", hint=exc.hint) from None


def _train_mode_problem(
    record: ModuleRecord, anchor: str, consumer: str | None, consumer_arg: int | None
) -> str | None:
    """A site must be found in the train-mode graph too, when the forward differs between modes.

    The graphs are matched by structure (align.py), not by fx's node names. At a branch end the add
    must be there with the same shortcut (the branch may differ, e.g. a dropout or stochastic depth
    in train mode only); elsewhere the anchor must be there with the same inputs.
    """
    if record.train_reason:
        return f"its forward traces in eval mode but not in train mode ({record.train_reason})"
    if record.train_graph is None:
        return None
    name = consumer or anchor
    a = record.node(name)
    b = record.node(record.train_names.get(name, ""), train=True)
    if a is None or b is None or (a.op, a.target, len(a.args)) != (b.op, b.target, len(b.args)):
        return f"its forward differs between train and eval mode at {name}"
    same_inputs = [same_source(x, y, record.train_names) for x, y in zip(a.args, b.args)]
    if consumer is not None and consumer_arg is not None:
        del same_inputs[consumer_arg]  # the branch itself may differ between modes
    if not all(same_inputs):
        return f"its forward differs between train and eval mode at {name}"
    return None


@lru_cache(maxsize=64)
def _block_cost(block: str, cls: Any, options: tuple) -> Callable[[tuple[int, ...]], tuple[int, int]]:
    """(parameters, FLOPs per image) of a block at a (C, H, W) site, measured on the meta device
    (cached per class: another class registered under the same name is measured anew)."""

    @cache
    def cost(chw: tuple[int, ...]) -> tuple[int, int]:
        try:
            with torch.device("meta"):
                instance = cls(chw[0], **dict(options)).eval()  # a norm in train mode refuses one value (1x1 map)
                x = torch.empty(1, *chw)
            with FlopCounterMode(display=False) as counter:
                instance(x)
        except AttnInjectError:  # the block refuses these options or this map, in its own words
            raise
        except Exception as exc:  # a user's block with a bug: say which, before anything is changed
            raise AttnInjectError(
                f"block {block!r} fails when built and run on a {'x'.join(map(str, chw))} map ({one_line(exc)})",
                hint="Check the block's code and its options.",
            ) from None
        return sum(p.numel() for p in instance.parameters()), counter.get_total_flops()

    return cost


def _nothing_matched(
    plan: Plan, candidates: list[Candidate], include: tuple[str, ...], exclude: tuple[str, ...]
) -> str:
    names = ", ".join(repr(r.name) for r in plan.rules)
    found: Counter[str] = Counter()
    for rule in list_rules():
        if rule.kind == "block" or rule.options or conv_index(rule.insert) is not None:
            continue  # placement variants of the structural rules counted here
        found[rule.name] = sum(rule_matches(rule, c) for c in candidates)
    contains = ", ".join(f"{name} x{n}" for name, n in sorted(found.items()) if n) or "no residual blocks or conv units"
    msg = f"rule {names} matched nothing in {plan.model_class}; the model contains: {contains}"
    if include or exclude:
        msg += f" (before include={list(include)} exclude={list(exclude)})"
    return "; ".join([msg, *plan.notes()])
