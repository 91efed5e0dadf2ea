"""Node kinds and node facts: what each graph node does as far as matching cares (conv, norm,
activation, add, gate, other), and what the example forward learned about it (``NodeFacts``).

Convolutions and norms are the "learned ops" a rule counts; they carry their channels and the
shape of their output, so a branch can be checked to end in a conv map (NCL, NCHW, NCDHW: convs
of 1, 2 or 3 spatial dims; a kernel has one size per dim).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..blocks import is_attention_block
from ..patched import add_shortcut

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_ACT_MODULES = ("torch.nn.modules.activation", "timm.layers.activations", "timm.layers.activations_me")
_ACT_FUNCS = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.sigmoid,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    F.tanh,
}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # (torchvision's Conv3DSimple etc. are Conv3d)
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
ADD_FUNCS = {operator.add, operator.iadd, torch.add}
MUL_FUNCS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}


OpKind = Literal["conv", "norm"]
ModuleKind = Literal["conv", "norm", "act", "attn", "linear", "module", "other"]
ModuleOf = Callable[[str], nn.Module]  # a graph's owner's get_submodule


@dataclass(frozen=True)
class LearnedOp:
    """A conv or norm on a path, with what matching needs to know about it."""

    kind: OpKind
    path: str  # module path, or owner path + ":" + node name for a functional op
    channels: int  # output channels (conv) or normalised channels (norm)
    out_shape: tuple[int, ...] | None
    in_channels: int = 0
    kernel: tuple[int, ...] = ()  # conv: one size per spatial dim
    groups: int = 1

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels


@dataclass(frozen=True)
class NodeFacts:
    """What the example forward learned about one graph node (``node.meta[META_KEY]``)."""

    shape: tuple[int, ...] | None = None  # of the tensor it produced; None for anything else
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    container: bool = False  # a list, tuple or dict holding tensors
    ops: tuple[LearnedOp, ...] = ()  # the learned ops it performs (a child's: those on its main path)


META_KEY = "attn_inject"
_NOT_RUN = NodeFacts()


def facts(node: fx.Node) -> NodeFacts:
    """The node's facts; empty for a node the example forward did not run."""
    return node.meta.get(META_KEY, _NOT_RUN)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The shape of the tensor the node produced in the example forward, if it produced one."""
    return facts(node).shape


def shape_of_value(value: object) -> tuple[int, ...] | None:
    """The shape of a tensor value; None for anything else."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def target_path(node: fx.Node) -> str:
    """The attribute path a call_module or get_attr node names."""
    if not isinstance(node.target, str):
        raise TypeError(f"{node.op} node {node.name} has no attribute path")
    return node.target


def join_path(prefix: str, name: str) -> str:
    """A module path inside ``prefix`` ("" is the model itself)."""
    return f"{prefix}.{name}" if prefix else name


def module_kind(module: nn.Module) -> ModuleKind:
    """conv | norm | act | attn | linear | module (has its own forward worth tracing) | other."""
    if is_attention_block(module):
        return "attn"
    if isinstance(module, CONV_TYPES):
        return "conv"
    if isinstance(module, _NORM_TYPES) or ("Norm" in type(module).__name__ and not _has_children(module)):
        return "norm"
    if type(module).__module__ in _ACT_MODULES and not _has_children(module):
        return "act"
    if isinstance(module, nn.Linear):
        return "linear"
    return "module" if _has_children(module) else "other"


def is_primitive(module: nn.Module) -> bool:
    """Leaves of the analysis: their own forward is never traced."""
    return module_kind(module) != "module"


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def norm_channels(module: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 1 else 0


def module_op(module: nn.Module, path: str, out_shape: tuple[int, ...] | None) -> LearnedOp | None:
    """The learned op a primitive conv or norm module performs."""
    kind = module_kind(module)
    if kind == "conv" and isinstance(module, CONV_TYPES):
        kernel = tuple(module.kernel_size)
        return LearnedOp("conv", path, module.out_channels, out_shape, module.in_channels, kernel, module.groups)
    if kind == "norm":
        return LearnedOp("norm", path, norm_channels(module), out_shape)
    return None


def function_op(
    node: fx.Node, owner: str, out_shape: tuple[int, ...] | None, arg_shape: Callable[[object], tuple[int, ...] | None]
) -> LearnedOp | None:
    """The learned op of a functional conv1d/2d/3d or norm call, read from its weight's shape."""
    path = f"{owner}:{node.name}" if owner else f":{node.name}"
    if node.op == "call_function" and node.target in _CONV_FUNCS:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        w = arg_shape(weight)
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        if w is None or len(w) not in (3, 4, 5) or not isinstance(groups, int):
            return None
        return LearnedOp("conv", path, w[0], out_shape, w[1] * groups, tuple(w[2:]), groups)
    if node.op == "call_function" and node.target in (F.batch_norm, F.group_norm, F.layer_norm, torch.batch_norm):
        return LearnedOp("norm", path, out_shape[1] if out_shape and len(out_shape) > 1 else 0, out_shape)
    return None


def is_activation_node(node: fx.Node, module_of: ModuleOf) -> bool:
    """An elementwise activation: an act module, function or tensor method."""
    if node.op == "call_module":
        return module_kind(module_of(target_path(node))) == "act"
    if node.op == "call_function":
        return node.target in _ACT_FUNCS
    return node.op == "call_method" and node.target in _ACT_METHODS


def is_add(node: fx.Node) -> bool:
    """A two-tensor add (attn_inject's own add_shortcut, left by an earlier injection, included)."""
    if node.op == "call_function":
        return (node.target in ADD_FUNCS and "out" not in node.kwargs) or node.target is add_shortcut
    return node.op == "call_method" and node.target in ("add", "add_")


def is_scaling(node: fx.Node) -> bool:
    """A binary product/quotient (where a gate or a layer scale multiplies a map)."""
    if node.op == "call_function":
        return node.target in MUL_FUNCS
    return node.op == "call_method" and node.target in ("mul", "mul_", "div", "div_")


def is_inplace(node: fx.Node, module_of: ModuleOf) -> bool:
    """A node that mutates its first argument and returns it."""
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.kwargs.get("inplace") is True or (name.endswith("_") and not name.endswith("__"))
    if node.op == "call_module":
        return getattr(module_of(target_path(node)), "inplace", False) is True
    return False
