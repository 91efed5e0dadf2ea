"""Train and eval graphs aligned: which node of a module's train-mode graph is which node of its
eval-mode graph, by structure.

fx names nodes by their op and a counter, so a train-only op (stochastic depth written as
``keep_prob + torch.rand(...)``, a dropout) shifts the names of every later node of the same kind.
Nodes are matched instead by what they compute: the same op and target, the same constant
arguments, and node arguments that are matched already, where a train graph may have inserted
ops of its own between an argument and its user (``x + drop_path(branch)`` against ``x + branch``).
"""

from __future__ import annotations

from torch import fx

from .bitsets import Ancestors


def align(eval_graph: fx.Graph, train_graph: fx.Graph) -> dict[str, str]:
    """eval node name -> train node name, for every eval node with a structural counterpart."""
    by_kind: dict[tuple, list[fx.Node]] = {}
    for node in train_graph.nodes:
        by_kind.setdefault(_kind(node), []).append(node)
    anc = Ancestors(train_graph)
    matched: dict[fx.Node, fx.Node] = {}
    used: set[fx.Node] = set()
    for node in eval_graph.nodes:
        candidates = [c for c in by_kind.get(_kind(node), ()) if c not in used]
        for exact in (True, False):  # prefer the same constants (x[0] is x[0]); else a mode flag may differ
            found = next((c for c in candidates if _same_inputs(node, c, matched, anc, used, exact)), None)
            if found is not None:
                matched[node] = found
                used.add(found)
                break
    return {e.name: t.name for e, t in matched.items()}


def _kind(node: fx.Node) -> tuple:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", repr(node.target))
    return node.op, target, len(node.args), tuple(sorted(node.kwargs))


def _same_inputs(node: fx.Node, candidate: fx.Node, matched: dict, anc: Ancestors, used: set, exact: bool) -> bool:
    if node.op in ("placeholder", "get_attr"):
        return True  # same target
    pairs = list(zip(node.args, candidate.args)) + [(node.kwargs[k], candidate.kwargs[k]) for k in node.kwargs]
    return all(_same_arg(a, b, matched, anc, used, exact) for a, b in pairs)


def _same_arg(a, b, matched: dict, anc: Ancestors, used: set, exact: bool) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a not in matched:
            return False
        mine = matched[a]
        # the same node, or one the train graph computes from it with ops of its own in between
        return b is mine or (b not in used and anc.has(b, mine))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_arg(x, y, matched, anc, used, exact) for x, y in zip(a, b))
    return not exact or (type(a) is type(b) and a == b)


def same_source(a, b, names: dict[str, str]) -> bool:
    """An eval-graph argument and a train-graph one take the same nodes (constants, such as a
    mode flag, may differ)."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and names.get(a.name) == b.name
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_source(x, y, names) for x, y in zip(a, b))
    return True
