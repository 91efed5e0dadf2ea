"""Regions of a traced graph as int bitsets: ancestors, main paths, and gate (modulator) paths.

A residual's branch is the set of nodes that lead to one input of the add but not to both; a gate
is what only feeds the small operand of a broadcast product (SE, ECA, spatial attention), whose
convs do not count as the branch's. Bitsets make these set operations cheap on big graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import fx

from .nodes import LearnedOp, facts, is_scaling, shape_of


class Ancestors:
    """Ancestor sets of a graph's nodes as int bitsets (node i is bit i), along ``inputs_of`` edges."""

    def __init__(
        self, graph: fx.Graph, inputs_of: Callable[[fx.Node], Iterable[fx.Node]] = lambda n: n.all_input_nodes
    ):
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.anc: dict[fx.Node, int] = {}
        for node in self.nodes:
            bits = 0
            for parent in inputs_of(node):
                bits |= self.anc[parent] | (1 << self.index[parent])
            self.anc[node] = bits

    def has(self, node: fx.Node, ancestor: fx.Node) -> bool:
        return bool(self.anc[node] >> self.index[ancestor] & 1)


class GraphBits(Ancestors):
    """Data-flow ancestors of a graph's nodes (reads of a shape or dtype are not edges), gate paths,
    and the nodes that depend on the graph's inputs."""

    def __init__(self, graph: fx.Graph):
        metadata: set[fx.Node] = set()
        for node in graph.nodes:
            if _reads_metadata(node, metadata):
                metadata.add(node)
        super().__init__(graph, lambda node: [p for p in data_inputs(node) if p not in metadata])
        self.gates = self._gate_bits()
        self.inputs = sum(1 << self.index[n] for n in graph.find_nodes(op="placeholder") if shape_of(n))
        placeholders = sum(1 << self.index[n] for n in graph.find_nodes(op="placeholder"))
        self.from_inputs = placeholders
        for i, node in enumerate(self.nodes):
            if self.anc[node] & placeholders:
                self.from_inputs |= 1 << i

    def upto(self, node: fx.Node) -> int:
        """The node and all its ancestors."""
        return self.anc[node] | (1 << self.index[node])

    def frontier(self, bits: int) -> int:
        """The nodes of a region that are not ancestors of another node of it (its latest nodes)."""
        older = 0
        for node in self.nodes_in(bits):
            older |= self.anc[node]
        return bits & ~older

    def nodes_in(self, bits: int) -> list[fx.Node]:
        return [n for i, n in enumerate(self.nodes) if bits >> i & 1]

    def ops_in(self, bits: int) -> tuple[LearnedOp, ...]:
        """Learned ops of the nodes in a region, in graph order, gate paths excluded."""
        return tuple(op for n in self.nodes_in(bits & ~self.gates) for op in facts(n).ops)

    def main_path_ops(self) -> tuple[LearnedOp, ...]:
        """Ops on paths from a tensor input to the output."""
        from_input = self.inputs
        for i, node in enumerate(self.nodes):
            if self.anc[node] & from_input:
                from_input |= 1 << i
        output = self.nodes[-1]
        return self.ops_in(from_input & self.anc[output])

    def _gate_bits(self) -> int:
        """Nodes that only compute a broadcast multiplier (SE/ECA-style gates, spatial attention)."""
        gates = 0
        for node in self.nodes:
            if not is_scaling(node) or len(node.args) < 2:
                continue
            a, b = node.args[0], node.args[1]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            size_a, size_b = _numel(unexpanded_shape(a)), _numel(unexpanded_shape(b))
            if size_a is None or size_b is None or size_a == size_b:
                continue
            small, big = (a, b) if size_a < size_b else (b, a)
            gates |= self.upto(small) & ~self.upto(big)
        return gates


_METADATA_METHODS = {"size", "dim", "numel", "stride", "is_contiguous"}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_TEMPLATE_METHODS = {"expand_as", "view_as", "reshape_as", "type_as"}  # the 2nd tensor gives only a shape/dtype


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values (not just their shape) flow into ``node``."""
    if node.op == "call_method" and node.target in _TEMPLATE_METHODS and isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    return node.all_input_nodes


def _reads_metadata(node: fx.Node, metadata: set[fx.Node]) -> bool:
    """A node computing a size, dtype or such from tensors (``x.shape[-2:]``, ``x.size(1) // 2``)."""
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in _METADATA_ATTRS:
        return True
    if node.op == "call_function" and node.target is len:
        return True
    inputs = node.all_input_nodes
    return node.op == "call_function" and shape_of(node) is None and bool(inputs) and all(i in metadata for i in inputs)


def unexpanded_shape(node: fx.Node) -> tuple[int, ...] | None:
    while node.op == "call_method" and node.target in ("expand", "expand_as") and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return shape_of(node)


def _numel(shape: tuple[int, ...] | None) -> int | None:
    if shape is None:
        return None
    n = 1
    for s in shape:
        n *= s
    return n
