"""The only code that changes the user's model: register the blocks and install edited forwards.

Every module that gets a block keeps its identity: the block is registered on it under the
site's name and its forward becomes a PatchedForward running the edited graph; so do the
alternate forwards other code swaps in later (``forward_fuse``: matching/alternates.py). ``splice``
returns an Undo that restores the model exactly (used when verification fails).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections import defaultdict
from dataclasses import dataclass, field

from torch import fx, nn

from ..blocks import spec_of
from ..graph.analyze import ModuleRecord
from ..graph.code_key import code_key
from ..graph.nodes import is_add
from ..matching.alternates import Alternate
from ..matching.plan import Plan, Site
from ..patched import Absent, GraphCode, PatchedForward, Variant, add_shortcut

_MISSING = Absent  # the name pickles of models patched before the re-layout refer to


@dataclass
class Undo:
    """What splice did, in order, so that it can be taken back."""

    added: list[tuple[nn.Module, str]] = field(default_factory=list)
    forwards: list[tuple[nn.Module, str, object]] = field(default_factory=list)
    constants: list[tuple[nn.Module, str]] = field(default_factory=list)
    slots: list[tuple[nn.Module, str, object]] = field(default_factory=list)  # empty attributes a block took

    def __call__(self) -> None:
        for module, method, previous in reversed(self.forwards):
            if previous is Absent:
                module.__dict__.pop(method, None)
            else:
                module.__dict__[method] = previous
        for module, name in reversed(self.constants):
            module.__dict__.pop(name, None)
        for module, name in reversed(self.added):
            delattr(module, name)
        for module, name, value in reversed(self.slots):
            module.__dict__[name] = value


def splice(plan: Plan, blocks: dict[str, nn.Module], alternates: tuple[Alternate, ...] = ()) -> Undo:
    """Apply ``plan``; ``blocks`` maps each site's module_name to its (ready) block. ``alternates``:
    the same sites in the alternate forwards (``forward_fuse``...) of the modules that get blocks."""
    by_record: dict[ModuleRecord, list[Site]] = defaultdict(list)
    for site, records in plan.site_records:
        for record in records:
            by_record[record].append(site)
    by_target: dict[tuple[int, str], list[ModuleRecord]] = defaultdict(list)
    for record in by_record:
        by_target[(id(record.module), record.method)].append(record)

    fresh = {s.name for s, _ in plan.site_records if (spec := spec_of(blocks[s.module_name])) and spec.fresh_output}
    compiled = _Compiled(fresh)
    undo = Undo()
    try:
        for owner_records in by_target.values():
            module, method = owner_records[0].module, owner_records[0].method
            variants: dict[Variant, GraphCode] = {}
            for record in owner_records:
                sites = by_record[record]
                if record.train_graph is None:
                    variants[(record.fixed, None)] = compiled(record.traced_graph, sites)
                else:
                    variants[(record.fixed, False)] = compiled(record.traced_graph, sites)
                    train_sites = [_in_train_graph(s, record.train_names) for s in sites]
                    variants[(record.fixed, True)] = compiled(record.train_graph, train_sites)
            for site in {s.name: s for r in owner_records for s in by_record[r]}.values():
                if site.name in module.__dict__:  # an empty attention slot (timm's ``self.se = None``)
                    undo.slots.append((module, site.name, module.__dict__.pop(site.name)))
                module.add_module(site.name, blocks[site.module_name])
                undo.added.append((module, site.name))
            constants = {k: v for r in owner_records for k, v in r.constants.items()}
            _install(module, method, variants, constants, undo)
        by_method: dict[tuple[int, str], list[Alternate]] = defaultdict(list)
        for alternate in alternates:
            by_method[(id(alternate.record.module), alternate.method)].append(alternate)
        for same in by_method.values():  # fused forwards serve inference: one graph for both modes
            variants = {(a.record.fixed, None): compiled(a.graph, list(a.sites)) for a in same}
            constants = {k: v for a in same for k, v in a.constants.items()}
            _install(same[0].record.module, same[0].method, variants, constants, undo)
    except BaseException:
        undo()
        raise
    return undo


class _Compiled:
    """The edited graphs' code, compiled once per code key and edit (graph/code_key.py): modules
    whose edited forwards read the same share one GraphCode."""

    def __init__(self, fresh: set[str]):
        self.fresh = fresh
        self.codes: dict[tuple, GraphCode] = {}

    def __call__(self, graph: fx.Graph, sites: list[Site]) -> GraphCode:
        key = code_key(graph)
        if key is None:
            return GraphCode.from_graph(_edited(graph, sites, self.fresh))
        edits = tuple((s.name, s.anchor, s.consumer, s.consumer_arg, s.name in self.fresh) for s in sites)
        code = self.codes.get((key, edits))
        if code is None:
            code = self.codes[(key, edits)] = GraphCode.from_graph(_edited(graph, sites, self.fresh))
        return code


def _install(
    module: nn.Module, method: str, variants: dict[Variant, GraphCode], constants: dict[str, object], undo: Undo
) -> None:
    """Store the edited graphs as ``module.<method>`` (and the constants they read), recorded in ``undo``."""
    for name, value in constants.items():
        module.__dict__[name] = value  # tensors fx stowed away while tracing
        undo.constants.append((module, name))
    previous = module.__dict__.get(method, Absent)
    undo.forwards.append((module, method, previous))
    module.__dict__[method] = PatchedForward(module, method, variants, None if previous is Absent else previous)


def _edited(graph: fx.Graph, sites: list[Site], fresh: set[str]) -> fx.Graph:
    """A copy of ``graph`` with a call to each site's block spliced in; the residual add after a
    block named in ``fresh`` (its output is a new tensor its backward does not need) goes in place."""
    graph = copy.deepcopy(graph)
    nodes = {n.name: n for n in graph.nodes}
    for site in sites:
        if site.consumer is not None:  # branch end: only the add sees the block's output
            consumer = nodes[site.consumer]
            anchor = consumer.args[site.consumer_arg]
            with graph.inserting_before(consumer):
                call = graph.call_module(site.name, (anchor,))
            consumer.replace_input_with(anchor, call)
            if site.name in fresh and _can_add_in_place(consumer):
                _add_in_place(graph, consumer, call)
        else:  # after the anchor: every later use sees the block's output
            anchor = nodes[site.anchor]
            with graph.inserting_after(anchor):
                call = graph.call_module(site.name, (anchor,))
            anchor.replace_all_uses_with(call, delete_user_cb=lambda user, call=call: user is not call)
    graph.lint()
    return graph


def _in_train_graph(site: Site, names: dict[str, str]) -> Site:
    """The site with its nodes named as in the train-mode graph (matched by structure)."""
    consumer = names[site.consumer] if site.consumer is not None else None
    return dataclasses.replace(site, anchor=names.get(site.anchor, site.anchor), consumer=consumer)


def _can_add_in_place(add: fx.Node) -> bool:
    """A plain out-of-place add of two tensors (fx turns ``out += shortcut`` into one)."""
    out_of_place = is_add(add) and add.target not in (add_shortcut, operator.iadd, "add_")
    return out_of_place and len(add.args) == 2 and not add.kwargs and all(isinstance(a, fx.Node) for a in add.args)


def _add_in_place(graph: fx.Graph, add: fx.Node, block_out: fx.Node) -> None:
    """Replace the add by :func:`add_shortcut`, which adds into the block's output when it can."""
    branch_first = add.args[0] is block_out
    other = add.args[1] if branch_first else add.args[0]
    with graph.inserting_after(add):
        fused = graph.call_function(add_shortcut, (block_out, other, branch_first))
    add.replace_all_uses_with(fused)
    graph.erase_node(add)
