"""A key for what fx's code generation reads of a graph: graphs with equal keys give the same source.

fx writes a graph's Python from its nodes in order: each node's op, name, target, arguments and type
annotation. Two graphs whose nodes agree in all of these (targets and other objects by identity,
plain values by type and value) generate the same source with the same globals, so code compiled
for one serves the other, on whichever module it runs (the code names the module's children, not
their sizes). splice.py compiles each edited forward once per key and edit: ResNet-50's 16
bottlenecks (8 structures) compile to two forwards, with and without a downsample. Graphs with
container arguments (a pytree codegen whose specs are objects of each graph) get no key and are
compiled alone.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ..fx_compat import pytree_info
from .trace_cache import value_key


def code_key(graph: fx.Graph) -> tuple | None:
    """Equal for graphs fx generates the same code for; None where that is not told here."""
    if pytree_info(graph) is not None or type(graph._codegen) is not fx.graph.CodeGen:
        return None
    return tuple(
        (node.op, node.name, _value(node.target), _value(node.args), _value(node.kwargs), id(node.type))
        for node in graph.nodes
    )


def _value(value: Any) -> Any:
    """Nodes by name, containers item by item, anything else as the trace cache keys a module's
    attributes (plain values by type and value, floats by their hex; other objects by identity)."""
    if isinstance(value, fx.Node):
        return "node", value.name
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_value(v) for v in value)
    if isinstance(value, dict):
        return type(value), tuple((_value(k), _value(v)) for k, v in value.items())
    if type(value) is slice:
        return slice, _value(value.start), _value(value.stop), _value(value.step)
    return value_key(value)  # functions and the graph's other objects: the very object (kept alive by it)
