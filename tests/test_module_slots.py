"""fx_compat.module_slots_held: fx traces inside share one setting of nn.Module's two slots.

fx's Tracer.trace writes ``nn.Module.__call__`` and ``__getattr__`` on the class for each trace; inside
the context those writes go to trampolines instead. The graphs must be the same, the class must be
left exactly as it was (also after a failed trace), and the slots must not be written per trace.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import fx, nn

from attn_inject import inject
from attn_inject.fx_compat import module_slots_held
from attn_inject.graph.analyze import analyze
from attn_inject.graph.trace import trace_module
from attn_inject.testing import look_trained
from tests.helpers.tiny_models import InplaceBasic

ORIGINAL = {name: nn.Module.__dict__[name] for name in ("__call__", "__getattr__")}


class SlotWatcher(nn.Module):
    """Notes, while traced, what nn.Module's class holds in its two slots."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.seen: list[tuple] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((nn.Module.__dict__["__call__"], nn.Module.__dict__["__getattr__"]))
        return self.conv(x).relu() + x


class Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv(x).sum() > 0:  # data-dependent: fx cannot trace it
            return x
        return -x


def _code(graph: fx.Graph) -> str:
    return graph.python_code("self").src


def test_traces_inside_give_the_same_graphs_without_writing_the_class_slots():
    module = SlotWatcher()
    outside = fx.Tracer().trace(module)
    with module_slots_held():
        held = {name: nn.Module.__dict__[name] for name in ORIGINAL}
        inside = fx.Tracer().trace(module)
        nested = fx.Tracer().trace(module)
        assert {name: nn.Module.__dict__[name] for name in ORIGINAL} == held  # still the trampolines
    assert _code(inside) == _code(nested) == _code(outside)
    assert "self.conv" in _code(inside) and "relu" in _code(inside)
    # fx's own trace put its wrapper functions on the class; the held one left the trampolines there
    assert module.seen[0] != tuple(ORIGINAL.values())
    assert module.seen[1] == module.seen[2] == tuple(held.values())
    assert held["__call__"] is not ORIGINAL["__call__"]
    assert {name: nn.Module.__dict__[name] for name in ORIGINAL} == ORIGINAL


def test_the_class_is_restored_after_a_failed_trace_and_an_error_in_the_body():
    with pytest.raises(RuntimeError, match="boom"), module_slots_held():
        with pytest.raises(fx.proxy.TraceError):
            fx.Tracer().trace(Failing())
        out = Failing()(torch.ones(1, 3, 2, 2))  # plain calls work inside, through the trampolines
        assert torch.equal(out, torch.ones(1, 3, 2, 2)) or torch.equal(out, -torch.ones(1, 3, 2, 2))
        raise RuntimeError("boom")
    assert {name: nn.Module.__dict__[name] for name in ORIGINAL} == ORIGINAL
    traced = fx.symbolic_trace(SlotWatcher())  # fx works as before afterwards
    assert "self.conv" in _code(traced.graph)


def test_nested_contexts_install_once():
    with module_slots_held():
        outer = nn.Module.__dict__["__call__"]
        assert outer is not ORIGINAL["__call__"]
        with module_slots_held():
            assert nn.Module.__dict__["__call__"] is outer
        assert nn.Module.__dict__["__call__"] is outer
    assert nn.Module.__dict__["__call__"] is ORIGINAL["__call__"]


def test_the_analysis_holds_the_slots_and_inject_stays_bitwise():
    """analyze() runs inside the context (a traced forward sees the trampolines), and the class is
    back to torch's own functions after inject."""
    model = look_trained(timm.create_model("resnet18").eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    seen: list = []
    original_forward = timm.models.resnet.BasicBlock.forward

    def watching(self, x):
        seen.append(nn.Module.__dict__["__call__"])
        return original_forward(self, x)

    try:
        timm.models.resnet.BasicBlock.forward = watching
        analyze(model, (x,))
    finally:
        timm.models.resnet.BasicBlock.forward = original_forward
    assert seen and all(fn is not ORIGINAL["__call__"] for fn in seen)
    assert len(set(map(id, seen))) == 1  # one trampoline for every trace and call of the analysis
    inject(model, "eca", after="basic")
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert {name: nn.Module.__dict__[name] for name in ORIGINAL} == ORIGINAL


def test_a_module_with_in_place_children_traces_alike_inside_and_outside():
    module = InplaceBasic(8, stride=2)
    outside = trace_module(module, "forward", frozenset(), False).graph
    with module_slots_held():
        inside = trace_module(module, "forward", frozenset(), False).graph
    assert _code(inside) == _code(outside)
