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
Where the reference forward runs anyway (inject with verification), it runs first and keeps the
outputs of the calls the meta run had completed around the failing one (call_trail.py,
replay.py): the re-run takes those, with the meta run's records, and computes only the rest (a
detector's region proposals and heads, not its backbone); ``real_values`` names the calls kept.
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

from collections.abc import Callable, Iterator
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
from .call_trail import CallTrail, Unit
from .folding import has_fold_method
from .meta_kernels import call_meta
from .nodes import META_KEY, NodeFacts
from .preserve import model_tensors, preserved, storage_key, storage_keys, written_tensors
from .replay import Replay

META = torch.device("meta")
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
    frontier: tuple[Unit, ...] = ()
    if refusal is None and device is not None:
        watch, trail = _MetaOps(), CallTrail()
        try:  # preserved: no meta tensor left in a cache; the watch refuses writes into real tensors
            with preserved(model, writes=()), _parameters_on_meta(model) as stand_ins:
                watch.watch(stand_ins, model_tensors(model), trail)  # those still real: tensor attributes
                with watch:
                    analysis = analyze(model, *_to_meta((args, kwargs)), trail=trail)
        except AttnInjectError as exc:  # the example forward failed on the meta device
            refusal = watch.first or f"the example forward needs values ({one_line(exc)})"
        else:
            refusal = watch.first or _values_needed(analysis)
            if refusal is None:
                _set_device(analysis, device)
                how = ShapesOnly(None, tuple(watch.writes.values()))
                return analysis, how, _reference_run(model, reference, how.writes)
        frontier = _standing(trail.frontier or ())
    if reference is not None and frontier and device is not None:
        return _analysis_replayed(model, args, kwargs, reference, refusal, frontier, device)
    with preserved(model) as seen:
        analysis = analyze(model, args, kwargs)
    how = ShapesOnly(refusal, seen.writes)
    return analysis, how, _reference_run(model, reference, how.writes)


def _reference_run(model: nn.Module, reference: Callable[[], Any] | None, writes: Any) -> Any:
    if reference is None:
        return None
    with preserved(model, writes=writes):
        return reference()


def _standing(frontier: tuple[Unit, ...]) -> tuple[Unit, ...]:
    """The frontier's units whose analysis stands on the meta device (none whose graph failed there)."""
    return tuple(
        unit
        for unit in frontier
        if not any(r.reason and any(text in r.reason for text in _FAILED_ON_EXAMPLE) for r in unit.records)
    )


def _analysis_replayed(
    model: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    reference: Callable[[], Any],
    refusal: str | None,
    frontier: tuple[Unit, ...],
    device: torch.device,
) -> tuple[Analysis, ShapesOnly, Any]:
    """The reference forward first, keeping the frontier's outputs; then the analysis on real tensors
    of what the meta run could not do, handed those outputs with the meta run's records."""
    replay = Replay(frontier)
    with preserved(model) as seen, replay.keeping():
        expected = reference()
    with preserved(model, writes=seen.writes):
        analysis = analyze(model, args, kwargs, replay=replay)
    _set_device(analysis, device)
    kept = ", ".join(dict.fromkeys(unit.record.path or "<model>" for unit in replay.handed)) or "none"
    how = ShapesOnly(f"{refusal}; analysed before it, outputs from the reference forward: {kept}", seen.writes)
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


def _meta_storage(tensor: torch.Tensor) -> int:
    """Which storage a meta tensor (or a view of it) lives in (meta storages have no data pointer)."""
    return tensor.untyped_storage()._cdata


def _to_meta(tree: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().to(META), tree)


@contextmanager
def _parameters_on_meta(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Every parameter and buffer swapped for a meta tensor like it (tied ones stay tied); put back on
    exit. Yields the original of each stand-in, by the stand-in's storage."""
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    made: dict[int, torch.Tensor] = {}
    originals: dict[int, torch.Tensor] = {}
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
                        originals[_meta_storage(meta)] = value
                    swapped.append((table, name, value))
                    table[name] = made[id(value)]
        yield originals
    finally:
        for table, name, value in reversed(swapped):
            table[name] = value


class _MetaOps(TorchDispatchMode):
    """Runs each op from the remembered meta kernels (``meta_kernels``) and remembers the first op
    that raised (on the meta device: one that needed values), caught or not. An op that would write
    into one of the model's real tensors raises before it runs (the meta run is then discarded)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.first: str | None = None
        self.real: dict[int, list[torch.Tensor]] = {}  # the model's tensors left real, by storage
        self.stand_ins: dict[int, torch.Tensor] = {}  # the original of each meta stand-in, by storage
        self.writes: dict[int, torch.Tensor] = {}  # the originals whose stand-ins were written into
        self.trail = CallTrail()

    def watch(self, stand_ins: dict[int, torch.Tensor], real: list[torch.Tensor], trail: CallTrail) -> None:
        self.stand_ins, self.real, self.trail = stand_ins, storage_keys(real), trail

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for written in written_tensors(func, args, kwargs or {}):
            if storage_key(written) in self.real:
                self._failed(f"{func} writes into a tensor of the model (taken back on real tensors only)")
                raise RuntimeError(f"attn_inject's shapes-only analysis does not run {func}: it writes into the model")
            original = self.stand_ins.get(_meta_storage(written)) if written.is_meta else None
            if original is not None:
                self.writes[id(original)] = original
        try:
            return call_meta(func, args, kwargs or {})
        except Exception as exc:
            self._failed(f"{func} needs values ({one_line(exc)})")
            raise

    def _failed(self, why: str) -> None:
        if self.first is None:
            self.first = why
            self.trail.freeze()  # the calls running now run again on real tensors


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
