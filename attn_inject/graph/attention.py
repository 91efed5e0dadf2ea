"""Channel attention a model already holds: timm's attention modules and any gate of the same shape.

A channel gate scales (or shifts) a feature map by one value per channel computed from the map
itself through learned layers: pool -> convs / linears -> sigmoid-like -> multiply (SE, ECA,
CBAM's channel half, MONAI's ChannelSELayer with Linear layers, SpeechBrain's ECAPA SEBlock whose
gate is the first operand), or add (global context). In a graph that is a product (or sum) of a map
``[N, C, *S]`` and a vector ``[N, C, 1, ...]`` that shares an input with it and passes through a conv
or linear layer on its own path; a layer scale (a parameter) and a normalisation (no learned layer)
are not gates. The vector's shape is what tells it, not a size difference, so an SE on a 1x1 map is
a gate too. The vector may keep more leading axes than two, as long as it is 1 on the map's last
ones: selective-kernel and split attention (SKNet, ResNeSt) weigh ``[N, paths, C, *S]`` by
``[N, paths, C, 1, ...]``, coordinate attention weighs ``[N, C, H, W]`` by ``[N, C, H, 1]`` (its
other factor, ``[N, C, 1, W]``, keeps the last axis and is not counted); a product of two maps of one
shape is not a gate. timm's attention modules named by ``timm.layers.get_attn`` count by class as
well (a GatherExcite with an extent resizes its gate back to the map's size).

Injected blocks of this library are not counted here: stacking the same block is refused
separately, and different blocks compose.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.layers import get_attn
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from .analyze import Analysis, ModuleRecord
from .bitsets import GraphBits, unexpanded_shape
from .nodes import facts, is_add, join_path, target_path

# timm's channel attention, by the names its get_attn knows them
_TIMM_CHANNEL_ATTENTION = ("se", "ese", "eca", "ceca", "ge", "gc", "cbam", "lcbam")
_PRODUCTS = {operator.mul, operator.imul, torch.mul}
_LEARNED_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d}


@lru_cache(maxsize=1)
def timm_attention_classes() -> tuple[type, ...]:
    classes = (get_attn(name) for name in _TIMM_CHANNEL_ATTENTION)
    return tuple(getattr(cls, "func", cls) for cls in classes)  # a functools.partial names its class


def gated_modules(analysis: Analysis) -> dict[int, str]:
    """id(module) -> its path, for every module that is or holds channel attention: a graph of it
    holds a gate, it is one of timm's attention classes, or it folds into a module that does."""
    gated: dict[int, str] = {}
    root = analysis.records[0].path if analysis.records else ""  # a folded copy's analysis keeps its place's paths
    for path, module in analysis.model.named_modules():
        if isinstance(module, timm_attention_classes()):
            gated[id(module)] = join_path(root, path)
    for record in analysis.records:
        if record.traced and any(is_channel_gate(record, node) for node in record.traced_graph.nodes):
            gated.setdefault(id(record.module), record.path)
        elif record.folded is not None:  # the module as it folds: name a gate that survives the fold
            for path in gated_modules(record.folded).values():
                kept = _submodule(record.module, path[len(record.path) + 1 :] if path != record.path else "")
                gated.setdefault(id(kept), path if kept is not record.module else record.path)
    return gated


def _submodule(module: nn.Module, path: str) -> nn.Module:
    """``module``'s descendant at ``path``, or ``module`` itself if there is none (folded away)."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return module


def attention_in(record: ModuleRecord, nodes: Iterable[fx.Node], gated: dict[int, str]) -> str | None:
    """Where channel attention is among ``nodes`` of ``record``'s graph: a gate of the graph, or a
    child that is or holds one (its path, and its class); None if there is none."""
    for node in nodes:
        if node.op == "call_module":
            child = record.module.get_submodule(target_path(node))
            inside = next((m for m in child.modules() if id(m) in gated), None)
            if inside is not None:
                return f"{gated[id(inside)] or '<model>'}: {type(inside).__name__}"
        elif is_channel_gate(record, node):
            return f"{record.path or '<model>'}: gate {node.name}"
    return None


def is_channel_gate(record: ModuleRecord, node: fx.Node) -> bool:
    """A product (or sum) of a map and a per-channel vector computed from what the map comes from
    through a conv or linear layer (see the module docstring)."""
    product = node.target in _PRODUCTS if node.op == "call_function" else node.target in ("mul", "mul_")
    if not (product and node.op in ("call_function", "call_method")) and not is_add(node):
        return False
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2:
        return False
    bits = record.traced_bits
    return any(_gates(record, bits, vector, map_, is_add(node)) for vector, map_ in (operands, operands[::-1]))


def _gates(record: ModuleRecord, bits: GraphBits, vector: fx.Node, map_: fx.Node, add: bool) -> bool:
    v, m = unexpanded_shape(vector), facts(map_).shape
    if v is None or m is None or len(v) != len(m) or len(m) < 3:
        return False
    kept = max(2, next((i + 1 for i in reversed(range(len(v))) if v[i] != 1), 0))  # leading axes it weighs
    if kept == len(m) or v[:kept] != m[:kept]:
        return False
    if add and all(s == 1 for s in m[kept:]):
        return False  # on a 1x1 map a residual add looks the same: only a product counts there
    shared = bits.upto(vector) & bits.upto(map_) & bits.from_inputs
    own = bits.upto(vector) & ~bits.upto(map_)
    return bool(shared) and any(_learned(record, n) for n in bits.nodes_in(own))


def _learned(record: ModuleRecord, node: fx.Node) -> bool:
    """A conv or linear layer: a module holding one, or a functional call."""
    if node.op == "call_module":
        child = record.module.get_submodule(target_path(node))
        return any(isinstance(m, (_ConvNd, nn.Linear)) for m in child.modules())
    return node.op == "call_function" and node.target in _LEARNED_FUNCTIONS
