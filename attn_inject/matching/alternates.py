"""The sites of a patched forward placed in the module's alternate forwards (``forward_fuse``...).

A module whose forward gets blocks and whose class defines an alternate forward that other code
swaps in later (graph/alternates.py) gets the same blocks in that method, at the corresponding
nodes: the two graphs are matched by structure (graph/align.py), where the forward may hold ops
the alternate lacks (``act(bn(conv(x)))`` against ``act(conv(x))``). A block after a norm the
alternate folded away goes after the node the norm read. A site with no counterpart, or an
alternate that cannot be traced, is refused before anything changes, naming the method.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from torch import fx

from ..errors import AttnInjectError
from ..fx_compat import module_slots_held
from ..graph.align import align
from ..graph.alternates import ALTERNATE_FORWARDS, alternate_methods, trace_alternate
from ..graph.analyze import ModuleRecord
from ..graph.nodes import module_kind, target_path
from ..graph.trace import TraceFailure
from ..graph.trace_cache import TraceCache
from .plan import Site


@dataclass(frozen=True, eq=False)
class Alternate:
    """The sites of one traced forward (``record``) placed in one alternate method's graph."""

    record: ModuleRecord
    method: str
    graph: fx.Graph
    constants: dict[str, Any]  # tensors fx stowed while tracing, named apart from the forward's
    sites: tuple[Site, ...]  # anchors and consumers named as in ``graph``


def plan_alternates(
    site_records: tuple[tuple[Site, tuple[ModuleRecord, ...]], ...], traces: TraceCache
) -> tuple[Alternate, ...]:
    """Every alternate forward of every module whose forward gets blocks, with its sites mapped.

    Raises one AttnInjectError naming the modules and methods where blocks could not be kept.
    """
    by_record: dict[ModuleRecord, list[Site]] = defaultdict(list)
    for site, records in site_records:
        for record in records:
            if record.method == "forward":
                by_record[record].append(site)
    alternates, problems = [], []
    with module_slots_held():  # one class patch for all the traces (fx_compat)
        for record, sites in by_record.items():
            for method in alternate_methods(record.module):
                try:
                    traced = trace_alternate(record.module, method, record.fixed, traces)
                    names = {v: k for k, v in align(traced.graph, record.traced_graph).items()}
                    mapped = tuple(_mapped(site, record, traced.graph, names) for site in sites)
                except (TraceFailure, _NoCounterpart) as exc:
                    problems.append((record, method, str(exc), sites))
                    continue
                graph, constants = _constants_apart(traced.graph, traced.constants, method)
                alternates.append(Alternate(record, method, graph, constants, mapped))
    if problems:
        raise _refused(problems)
    return tuple(alternates)


class _NoCounterpart(Exception):
    """A site of the forward has no place in the alternate's graph."""


def _mapped(site: Site, record: ModuleRecord, graph: fx.Graph, names: dict[str, str]) -> Site:
    """``site`` with its nodes named as in the alternate ``graph``; ``names``: forward node -> alternate node."""
    nodes = {n.name: n for n in graph.nodes}
    anchor = _counterpart(record, site.anchor, names)
    if site.consumer is None:
        return dataclasses.replace(site, anchor=anchor)
    consumer = names.get(site.consumer)
    args = list(nodes[consumer].args) if consumer is not None else []
    if nodes[anchor] not in args:
        raise _NoCounterpart(f"the add {site.consumer} that takes block {site.name} has no counterpart")
    return dataclasses.replace(site, anchor=anchor, consumer=consumer, consumer_arg=args.index(nodes[anchor]))


def _counterpart(record: ModuleRecord, name: str, names: dict[str, str]) -> str:
    """The alternate's node for the forward's node ``name``; a norm the alternate folded away (into
    the conv before it) stands for the node it read."""
    node = record.node(name)
    while node is not None and node.name not in names:
        folded = node.op == "call_module" and module_kind(record.module.get_submodule(target_path(node))) == "norm"
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        node = inputs[0] if folded and inputs else None
    if node is None:
        raise _NoCounterpart(f"the value {name} that a block takes has no counterpart")
    return names[node.name]


def _constants_apart(graph: fx.Graph, constants: dict[str, Any], method: str) -> tuple[fx.Graph, dict[str, Any]]:
    """Tensors fx stowed while tracing the alternate, renamed so they do not meet the forward's."""
    renamed = {}
    for node in graph.find_nodes(op="get_attr"):
        if node.target in constants:
            renamed[f"{node.target}_{method}"] = constants[node.target]
            node.target = f"{node.target}_{method}"
    return graph, renamed


def _refused(problems: list[tuple[ModuleRecord, str, str, list[Site]]]) -> AttnInjectError:
    record, method, reason, _ = problems[0]
    owners = {r.path for r, _, _, _ in problems}
    more = f" and {len(owners) - 1} more module(s)" if len(owners) > 1 else ""
    sites = sorted({s.path or "<model>" for *_, sites in problems for s in sites})
    cls = type(record.module).__name__
    return AttnInjectError(
        f"blocks in {record.path or '<model>'} ({cls}.forward){more} would be lost when {ALTERNATE_FORWARDS[method]} "
        f"swaps in {cls}.{method}: {reason}",
        hint=f"Exclude those sites (exclude={sites[:3]}{'...' if len(sites) > 3 else ''}) or choose a rule "
        "that places the blocks elsewhere (e.g. after='residual').",
    )
