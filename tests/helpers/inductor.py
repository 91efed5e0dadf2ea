"""torch.compile with inductor, keeping the graphs dynamo hands it, to count the blocks in them."""

from __future__ import annotations

import torch
from torch import nn


def compile_and_run(
    model: nn.Module, x: torch.Tensor, fullgraph: bool
) -> tuple[torch.Tensor, list[torch.fx.GraphModule]]:
    """The compiled model's output on ``x`` (checked against a second, cached call) and the graphs
    inductor compiled; dynamo's caches are reset before and after."""
    from torch._inductor.compile_fx import compile_fx

    graphs: list[torch.fx.GraphModule] = []

    def inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=inductor, fullgraph=fullgraph)
        with torch.no_grad():
            out = compiled(x)
            assert torch.equal(compiled(x), out)  # the cached compiled code, same answer
    finally:
        torch._dynamo.reset()
    return out, graphs


def graph_gates(gm: torch.fx.GraphModule) -> int:
    """The gain-2 gates in a graph (one tanh each: ``x + x * tanh(z / 2)``)."""
    return sum(1 for n in gm.graph.nodes if n.target in ("tanh", torch.tanh, torch.ops.aten.tanh.default))
