"""Where the two inputs of an add come from, followed across module boundaries.

Each module's graph is analysed on its own, but a residual's branch may start in a parent: in
transformers' EfficientNet the add sits in a final layer whose branch holds only the 1x1
projection, while the expand and depthwise convs are siblings in the parent. The analysis links
every tensor placeholder of a traced module to the node of the calling graph that produced that
very tensor (``ModuleRecord.sources``). From an add, both inputs are followed back, graph by graph
up through the callers, to the nearest nodes they share:

* a shared tensor (or a tensor split into parts by an op of the graph, as ``chunk``) is a fork:
  the add is a residual, and each side's learned ops are collected from the fork down to the add;
* shared only through a container that came from outside the graph (a dict or list argument, a
  child's dict or tuple output: LR-ASPP's ``{"low", "high"}`` features, an FPN's stage outputs),
  the two maps are different tensors: the add merges them, it is not a residual.

Data flow here is what carries values: a ``.shape`` / ``size()`` read (``interpolate(x,
size=low.shape[-2:])``) and the template of ``expand_as`` are not edges, and nodes computed from
parameters alone are not sources.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .analyze import ModuleRecord
from .nodes import LearnedOp, facts

Region = tuple[ModuleRecord, int]  # a record and a bitset over its graph's nodes


@dataclass(frozen=True)
class Fork:
    """The two sides of an add, each as regions of graphs from the fork down to the add."""

    sides: tuple[tuple[Region, ...], tuple[Region, ...]]
    followed: bool  # False: the fork could not be followed out of the add's graph (an opaque caller)

    def ops(self, side: int) -> tuple[LearnedOp, ...]:
        return tuple(op for record, bits in self.sides[side] for op in record.traced_bits.ops_in(bits))

    def local_bits(self, side: int) -> int:
        """The side's region in the add's own graph (the last region)."""
        return self.sides[side][-1][1]


@dataclass(frozen=True)
class Merge:
    """The two inputs do not fork from one tensor."""

    where: str  # the module in whose graph the inputs were found apart


def find_fork(record: ModuleRecord, a: fx.Node, b: fx.Node) -> Fork | Merge | None:
    """How the add's inputs ``a`` and ``b`` (nodes of ``record``'s graph) meet; None when one of
    them does not come from the module's inputs at all (a constant, a positional embedding)."""
    bits = record.traced_bits
    return _fork_in(record, bits.upto(a), bits.upto(b), ((), ()))


def _fork_in(record: ModuleRecord, up_a: int, up_b: int, inner: tuple) -> Fork | Merge | None:
    bits = record.traced_bits
    sides = (((record, up_a),) + inner[0], ((record, up_b),) + inner[1])
    common = up_a & up_b & bits.from_inputs
    if common:
        if any(_is_fork(n) for n in bits.nodes_in(bits.frontier(common))):
            return Fork((((record, up_a & ~common),) + inner[0], ((record, up_b & ~common),) + inner[1]), True)
        return Merge(record.path or "<model>")
    in_a, in_b = up_a & bits.inputs, up_b & bits.inputs
    if not in_a or not in_b:
        return None if not inner[0] else Merge(record.path or "<model>")
    lifted_a, lifted_b = _lift(record, in_a), _lift(record, in_b)
    if lifted_a is None or lifted_b is None or lifted_a[0] is not lifted_b[0]:
        if not record.path:  # different arguments of the model itself
            return Merge("<model>")
        return Fork(sides, False)
    parent = lifted_a[0]
    return _fork_in(parent, lifted_a[1], lifted_b[1], sides)


def _is_fork(node: fx.Node) -> bool:
    """A tensor, or a container of tensors made inside this graph from one (chunk, split, unbind)."""
    node_facts = facts(node)
    if node_facts.shape is not None:
        return True
    return node_facts.container and node.op in ("call_function", "call_method")


def _lift(record: ModuleRecord, placeholders: int) -> tuple[ModuleRecord, int] | None:
    """The caller's record and the ancestry of the nodes that produced these placeholders' tensors."""
    parent, up = None, 0
    for node in record.traced_bits.nodes_in(placeholders):
        source = record.sources.get(node)
        if source is None or (parent is not None and source[0] is not parent) or source[0].bits is None:
            return None
        parent = source[0]
        up |= parent.traced_bits.upto(source[1])
    return (parent, up) if parent is not None else None
