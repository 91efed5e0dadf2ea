"""The analysis in shapes only: the example forward on the meta device, where no op computes values.

What matching needs from the analysis forward is shapes, dtypes and the order of calls, not values.
The analysis therefore runs first with the example arguments, and the model's parameters and
buffers, swapped for meta tensors of the same shapes, dtypes and strides (the same Parameter objects
are put back on exit, in ``finally``): a convolution then costs its shape arithmetic only. What the
forward leaves in the model (a cache of anchors computed on the meta device) is taken back
(``preserved``), and the nodes' facts are given the model's real device.

A forward may need real values: ``.item()`` or ``if tensor:`` (data-dependent control flow),
``.tolist()``, numpy, a tensor attribute that is not a buffer (it stays on the real device). On
the meta device each of those raises; the first op that raises stops the meta run (``ValuesNeeded``,
which the model's and the analysis' ``except Exception`` let through), as does an example forward
that fails: the analysis runs again on the real tensors, and ``shapes_only`` says why (the op and
its error). Where the reference forward runs anyway (inject with verification), it runs first and
keeps the outputs of the calls the meta run had completed around the failing one and of those
after it (call_trail.py, replay.py): the re-run takes those, with the meta run's records or records
made on meta, and computes only what needs values (a detector's region proposals and box
selection, not its backbone or heads); ``real_values`` names the calls kept.
An op that would write into a tensor of the model still on the real device is refused before it
runs, so the meta run needs no copy-on-write watch; the writes into the stand-ins of parameters and
buffers are noted (``ShapesOnly.writes``: what the real forwards then copy up front, see
``preserved``).

Many meta kernels are Python (a batch norm costs 1.6 ms on meta, more than the real op on a small
map); ``meta_kernels`` replays the metadata of calls seen before. Even so, a failed meta run costs a
second analysis, so the meta run is tried only where the convolutions' work is large: their weights
times the example's pixels at least ``MIN_WORK`` (ResNet-50 at 224 px is 1.2e12; ResNet-18 5.6e11,
MobileNetV3-Large 2.1e11 and torchvision's Faster R-CNN MobileNetV3-320, whose meta run fails at its
region proposals, 5.1e11 run on real tensors: its plan takes 0.55-0.62 s with the failed meta run
first against 0.35-0.38 s without, one thread).
Models with modules that fold their branches (folding.py calls ``reparameterize()`` & co. on
copies, and a fold that fails is taken for no fold) and models spread over several devices, or
not on one real device, are analysed on real tensors from the start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils import _pytree as pytree

from ..errors import AttnInjectError, one_line
from .analyze import Analysis, analyze
from .call_trail import CallTrail, Unit
from .folding import has_fold_method
from .meta_run import META, ValuesNeeded, on_meta, to_meta, values_needed
from .nodes import META_KEY, NodeFacts
from .preserve import preserved
from .replay import Replay

MIN_WORK = 8e11  # conv weights x example pixels below which a meta run is not worth the risk of a second run


@dataclass(frozen=True)
class ShapesOnly:
    """How the analysis ran: on the meta device (``real_values`` None), or on real tensors and why.

    ``writes``: the model's tensors the forward wrote into (usually none in eval mode), as the meta
    run or the copy-on-write watch of the real run saw them, for ``preserved(model, writes=...)``.
    """

    real_values: str | None = None
    writes: tuple[torch.Tensor, ...] | None = None

    @property
    def shapes_only(self) -> bool:
        return self.real_values is None


def analyze_shapes_first(
    model: nn.Module, args: tuple, kwargs: dict[str, Any], reference: Callable[[], Any] | None = None
) -> tuple[Analysis, ShapesOnly, Any]:
    """The analysis of ``analyze``, on the meta device where it needs no values, else on real tensors;
    and the output of ``reference()`` (the model's reference forward; None if not given), run after
    the analysis with what it writes known, or first where it hands outputs to the analysis."""
    device, refusal = _meta_refusal(model, args, kwargs)
    if refusal is None and device is not None:
        trail = CallTrail()
        watch = None
        try:
            with on_meta(model, trail) as watch:
                analysis = analyze(model, *to_meta((args, kwargs)), trail=trail)
        except ValuesNeeded as stop:  # the first op that needed values (a model may have swallowed it)
            refusal = (watch and watch.first) or str(stop)
        except AttnInjectError as exc:  # the example forward failed on the meta device
            refusal = (watch and watch.first) or f"the example forward needs values ({one_line(exc)})"
        else:
            refusal = watch.first or values_needed(analysis.records)
            if refusal is None:
                _set_device(analysis, device)
                how = ShapesOnly(None, tuple(watch.writes.values()))
                return analysis, how, _reference_run(model, reference, how.writes)
        if watch is not None and watch.first is not None and reference is not None:
            return _analysis_replayed(model, args, kwargs, reference, refusal, trail, device)
    with preserved(model) as seen:
        analysis = analyze(model, args, kwargs)
    how = ShapesOnly(refusal, seen.writes)
    return analysis, how, _reference_run(model, reference, how.writes)


def _reference_run(model: nn.Module, reference: Callable[[], Any] | None, writes: Any) -> Any:
    if reference is None:
        return None
    with preserved(model, writes=writes):
        return reference()


def _standing(units: tuple[Unit, ...]) -> tuple[Unit, ...]:
    """The units whose analysis stands on the meta device: those where no graph failed (it may have
    needed values), else, in their place, their own calls that stand."""
    return tuple(
        kept
        for unit in units
        for kept in ((unit,) if values_needed(unit.records) is None else _standing(unit.children))
    )


def _analysis_replayed(
    model: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    reference: Callable[[], Any],
    refusal: str | None,
    trail: CallTrail,
    device: torch.device,
) -> tuple[Analysis, ShapesOnly, Any]:
    """The reference forward first, keeping outputs (replay.py); then the analysis on real tensors of
    what needs values, handed those outputs with records made on the meta device."""
    replay = Replay(model, _standing(trail.frontier or ()), trail.failing)
    with preserved(model) as seen, replay.keeping():
        expected = reference()
    with preserved(model, writes=seen.writes):
        analysis = analyze(model, args, kwargs, replay=replay)
    _set_device(analysis, device)
    kept = ", ".join(dict.fromkeys(replay.handed)) or "none"
    how = ShapesOnly(f"{refusal}; on meta, outputs from the reference forward: {kept}", seen.writes)
    return analysis, how, expected


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


def _set_device(analysis: Analysis, device: torch.device) -> None:
    """The nodes' facts on the model's device, as a run on real tensors would have recorded them."""
    for record in analysis.records:
        for graph in (record.graph, record.train_graph):
            for node in graph.nodes if graph is not None else ():
                facts = node.meta.get(META_KEY)
                if isinstance(facts, NodeFacts) and facts.device == META:
                    node.meta[META_KEY] = replace(facts, device=device)
