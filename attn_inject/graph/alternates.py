"""Alternate forwards: methods that code outside attn_inject later installs as a module's forward.

Inference tools swap a module's forward for a faster method of its class after folding its norm
into its conv: ultralytics' and YOLOv5's ``BaseModel.fuse()`` runs ``m.forward = m.forward_fuse``
on every Conv, YOLOX and YOLOv7 ``m.forward = m.fuseforward``, ultralytics' export
``m.forward = m.forward_split``. That assignment replaces the patched forward inject installed, so
the blocks in it would silently stop running. A module whose forward gets a block therefore gets
each of these methods its class defines patched too (surgery/splice.py): the swap then installs
the patched one. The names are a registry, not a list of classes: add a name here for another
framework's convention.
"""

from __future__ import annotations

import inspect
import types

from torch import nn

from .trace import TraceFailure, TraceResult
from .trace_cache import TraceCache

# method name -> what swaps it in (for messages)
ALTERNATE_FORWARDS: dict[str, str] = {
    "forward_fuse": "fuse()",  # ultralytics, YOLOv5: BaseModel.fuse()
    "fuseforward": "fuse()",  # YOLOv7, YOLOX: fuse() / fuse_model()
    "forward_split": "export",  # ultralytics: the exporter, on C2f-like modules
}


def alternate_methods(module: nn.Module) -> tuple[str, ...]:
    """The registered alternate forwards ``module``'s class defines."""
    return tuple(name for name in ALTERNATE_FORWARDS if hasattr(type(module), name))


def trace_alternate(module: nn.Module, method: str, fixed: frozenset, traces: TraceCache) -> TraceResult:
    """``module.<method>`` traced as its forward was (children as leaves, the same fixed arguments).

    Raises TraceFailure when it is not a plain method, cannot be traced, or differs between train
    and eval mode (the patched forward would then have to pick a graph by mode as well).
    """
    static = inspect.getattr_static(type(module), method)
    if not isinstance(static, types.FunctionType):
        raise TraceFailure(f"it is a {type(static).__name__}, not a method fx can trace")
    traced = traces.trace(module, method, fixed, training=False)
    if traced.reads_training:
        train = traces.trace(module, method, fixed, training=True)
        if train.graph.python_code("self").src != traced.graph.python_code("self").src:
            raise TraceFailure("it differs between train and eval mode")
    return traced
