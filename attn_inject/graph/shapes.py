"""The analysis in shapes only: the example forward on the meta device, where no op computes values.

What matching needs from the analysis forward is shapes, dtypes and the order of calls, not values.
The analysis therefore runs first with the example arguments, and the model's parameters and
buffers, swapped for meta tensors of the same shapes, dtypes and strides (the same Parameter objects
are put back on exit, in ``finally``): a convolution then costs its shape arithmetic only. What the
forward leaves in the model (a cache of anchors computed on the meta device) is taken back
(``preserved``), and the nodes' facts are given the model's real device.

A forward may need real values: ``.item()`` or ``if tensor:`` (data-dependent control flow),
``.tolist()``, numpy, a tensor attribute that is not a buffer (it stays on the real device). On
the meta device each of those raises; every op's exception is watched, even one the model or the
analysis catches, and any one of them (or an example forward that fails) discards the meta run:
the analysis runs again on the real tensors, and ``shapes_only`` says why (the op and its error).
The meta device's shape functions cost more than a small model's real arithmetic, though (on one
CPU thread at 224 px: MobileNetV3-Large's analysis 0.36 s on meta against 0.24 s real, ResNet-50's
0.21 s against 0.29 s), so the meta run is tried only where the convolutions' work is large: their weights times the
example's pixels at least ``MIN_WORK`` (ResNet-50 at 224 px is 1.2e12; ResNet-18 5.6e11, MobileNetV3-Large
2.1e11 and torchvision's Faster R-CNN MobileNetV3-320, whose meta run fails at its region proposals
and so costs a second analysis, 5.1e11 run on real tensors).
Models with modules that fold their branches (folding.py calls ``reparameterize()`` & co. on
copies, and a fold that fails is taken for no fold) and models spread over several devices, or
not on one real device, are analysed on real tensors from the start.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import AttnInjectError, one_line
from .analyze import Analysis, analyze
from .folding import has_fold_method
from .nodes import META_KEY, NodeFacts
from .preserve import preserved

META = torch.device("meta")
MIN_WORK = 8e11  # conv weights x example pixels below which the real analysis is the faster one


@dataclass(frozen=True)
class ShapesOnly:
    """How the analysis ran: on the meta device (``real_values`` None), or on real tensors and why."""

    real_values: str | None = None

    @property
    def shapes_only(self) -> bool:
        return self.real_values is None


def analyze_shapes_first(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[Analysis, ShapesOnly]:
    """The analysis of ``analyze``, on the meta device where it needs no values, else on real tensors."""
    device, refusal = _meta_refusal(model, args, kwargs)
    if refusal is None and device is not None:
        watch = _FirstError()
        try:
            with preserved(model), _parameters_on_meta(model), watch:  # no meta tensor left in a cache
                analysis = analyze(model, *_to_meta((args, kwargs)))
        except AttnInjectError as exc:  # the example forward failed on the meta device
            refusal = watch.first or f"the example forward needs values ({one_line(exc)})"
        else:
            refusal = watch.first or _values_needed(analysis)
            if refusal is None:
                _set_device(analysis, device)
                return analysis, ShapesOnly()
    return analyze(model, args, kwargs), ShapesOnly(refusal)


def _meta_refusal(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.device | None, str | None]:
    """The model's one device, or why the analysis cannot run on the meta device."""
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    devices |= {t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    if len(devices) != 1 or META in devices:
        return None, "the model and example are not on one real device"
    # the convolutions' weights times the example's pixels: about the arithmetic the meta run saves
    # (a detector's linear heads hold most of its parameters but little of its work)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, _ConvNd))
    pixels = sum(
        t.numel() // t.shape[0 if t.ndim == 3 else 1] for t in pytree.tree_leaves((args, kwargs)) if _is_map(t)
    )
    if weights * pixels < MIN_WORK:
        return None, (
            f"the example is small ({weights} conv weights x {pixels} pixels < {MIN_WORK:.0e}): real is faster"
        )
    folding = next((path for path, m in model.named_modules() if has_fold_method(m)), None)
    if folding is not None:
        return None, f"{folding or '<model>'} can fold its branches (its fold is tried on real weights)"
    return devices.pop(), None


def _is_map(value: Any) -> bool:
    """A floating point map: (C, H, W) (a list of images, as torchvision's detectors take) or (N, C, ...)."""
    return isinstance(value, torch.Tensor) and value.ndim >= 3 and value.is_floating_point()


def _to_meta(tree: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().to(META), tree)


@contextmanager
def _parameters_on_meta(model: nn.Module) -> Iterator[None]:
    """Every parameter and buffer swapped for a meta tensor like it (tied ones stay tied); put back on exit."""
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    made: dict[int, torch.Tensor] = {}
    try:
        for module in model.modules():
            tables: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
            for table in tables:
                for name, value in table.items():
                    if value is None:
                        continue
                    if id(value) not in made:
                        meta = value.detach().to(META)
                        made[id(value)] = (
                            nn.Parameter(meta, value.requires_grad) if table is module._parameters else meta
                        )
                    swapped.append((table, name, value))
                    table[name] = made[id(value)]
        yield
    finally:
        for table, name, value in reversed(swapped):
            table[name] = value


class _FirstError(TorchDispatchMode):
    """Remembers the first op that raised (on the meta device: one that needed values), caught or not."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.first: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            return func(*args, **(kwargs or {}))
        except Exception as exc:
            if self.first is None:
                self.first = f"{func} needs values ({one_line(exc)})"
            raise


# what analyze.py says of a module whose traced graph, or whose children's calls, failed on the example
_FAILED_ON_EXAMPLE = ("failed on the example", "cannot be observed")


def _values_needed(analysis: Analysis) -> str | None:
    """A module that ran eagerly because its graph failed on the meta example may need values."""
    for record in analysis.records:
        if record.reason and any(text in record.reason for text in _FAILED_ON_EXAMPLE):
            return f"{record.path or '<model>'}: {record.reason}"
    return None


def _set_device(analysis: Analysis, device: torch.device) -> None:
    """The nodes' facts on the model's device, as a run on real tensors would have recorded them."""
    for record in analysis.records:
        for graph in (record.graph, record.train_graph):
            for node in graph.nodes if graph is not None else ():
                facts = node.meta.get(META_KEY)
                if isinstance(facts, NodeFacts) and facts.device == META:
                    node.meta[META_KEY] = replace(facts, device=device)
