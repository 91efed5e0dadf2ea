"""Running a module on the meta device in place: its parameters and buffers swapped for meta
stand-ins, its arguments copied to meta, every op replayed from the remembered meta kernels and
watched (graph/shapes.py runs the whole model so; analyze.py, in a run on real tensors that was
handed a kept output (replay.py), one module call).

``on_meta(module)`` swaps the tensors and puts the same objects back on exit, and takes back what
the run leaves on the module (a cache of meta tensors: ``preserved``); the ``MetaOps`` watch stops
the run (``ValuesNeeded``) at the first op that needs values (on meta: raises), or that would write
into one of the module's tensors still on the real device (a plain tensor attribute), noting the
writes into the stand-ins instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import one_line
from .call_trail import CallTrail
from .meta_kernels import call_meta
from .preserve import model_tensors, preserved, storage_key, storage_keys, written_tensors

META = torch.device("meta")


def meta_storage(tensor: torch.Tensor) -> int:
    """Which storage a meta tensor (or a view of it) lives in (meta storages have no data pointer)."""
    return tensor.untyped_storage()._cdata


def to_meta(tree: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().to(META), tree)


@contextmanager
def parameters_on_meta(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
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
                        originals[meta_storage(meta)] = value
                    swapped.append((table, name, value))
                    table[name] = made[id(value)]
        yield originals
    finally:
        for table, name, value in reversed(swapped):
            table[name] = value


class MetaOps(TorchDispatchMode):
    """Runs each op from the remembered meta kernels (``meta_kernels``). The first op that raises (on
    the meta device: one that needs values), or that would write into one of the model's real
    tensors (refused before it runs), is remembered (``first``) and stops the run (``ValuesNeeded``)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.first: str | None = None
        self.real: dict[int, list[torch.Tensor]] = {}  # the model's tensors left real, by storage
        self.stand_ins: dict[int, torch.Tensor] = {}  # the original of each meta stand-in, by storage
        self.writes: dict[int, torch.Tensor] = {}  # the originals whose stand-ins were written into
        self.trail: CallTrail | None = None

    def watch(self, stand_ins: dict[int, torch.Tensor], real: list[torch.Tensor], trail: CallTrail | None) -> None:
        self.stand_ins, self.real, self.trail = stand_ins, storage_keys(real), trail

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for written in written_tensors(func, args, kwargs or {}):
            if storage_key(written) in self.real:
                raise self._failed(f"{func} writes into a tensor of the model (taken back on real tensors only)")
            original = self.stand_ins.get(meta_storage(written)) if written.is_meta else None
            if original is not None:
                self.writes[id(original)] = original
        try:
            return call_meta(func, args, kwargs or {})
        except Exception as exc:
            raise self._failed(f"{func} needs values ({one_line(exc)})") from None

    def _failed(self, why: str) -> ValuesNeeded:
        if self.first is None:
            self.first = why
            if self.trail is not None:
                self.trail.freeze()  # the calls running now run again on real tensors
        return ValuesNeeded(why)


class ValuesNeeded(BaseException):
    """Stops a meta run at the first op that needs values (or would write into a real tensor): its
    result is discarded then, so nothing after it is worth running. A BaseException, so that the
    analysis' and the model's ``except Exception`` (a graph that failed is retried eagerly) let it
    through; ``on_meta``'s callers catch it."""


# what analyze.py says of a module whose traced graph, or whose children's calls, failed on the example
FAILED_ON_EXAMPLE = ("failed on the example", "cannot be observed")


def values_needed(records: Iterable[Any]) -> str | None:
    """A module that ran eagerly because its graph failed on the meta example may need values."""
    for record in records:
        if record.reason and any(text in record.reason for text in FAILED_ON_EXAMPLE):
            return f"{record.path or '<model>'}: {record.reason}"
    return None


@contextmanager
def on_meta(module: nn.Module, trail: CallTrail | None = None) -> Iterator[MetaOps]:
    """The body runs with ``module``'s tensors on meta under the yielded watch (entered); all is put
    back on exit."""
    watch = MetaOps()
    # preserved: no meta tensor left in a cache; the watch refuses writes into real tensors
    with preserved(module, writes=()), parameters_on_meta(module) as stand_ins:
        watch.watch(stand_ins, model_tensors(module), trail)  # those still real: tensor attributes
        with watch:
            yield watch
