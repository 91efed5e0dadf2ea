"""Which module calls of the meta run stand when it first needs values: the frontier.

The analysis on the meta device may meet an op that needs values (torchvision's region proposals
call ``nonzero``) long after the heavy part of the forward (the backbone) was analysed. The calls
running at that moment are the failure's path: they must be analysed again on real tensors. The
calls each of them had completed by then (the backbone, the proposal head) stand: their records
are kept, and the re-run takes their outputs from the reference forward (``replay.py``) instead of
computing them again.

While the meta run goes, every module call the analysis handles is pushed while it runs and, once
done, becomes a ``Unit`` of its caller (of the top level for calls outside any: the model's own
code). ``freeze()``, called at the first op that fails, keeps the units of every call then running
(the frontier) and those calls' modules (``failing``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

from torch import nn

ModuleRecord = Any  # analyze.ModuleRecord (analyze.py imports this module)


class Analysis(Protocol):
    """What the trail reads of analyze.Analysis."""

    records: list[ModuleRecord]
    called: dict[int, None]


@dataclass(frozen=True)
class Unit:
    """A completed module call: its key in the analysis (module id, method, fixed arguments), the
    record it answers with, and what its analysis added (none for a repeat of a call analysed
    before): records, its own first, the modules it called, and the keys it analysed."""

    module: nn.Module
    key: tuple
    record: ModuleRecord
    records: tuple[ModuleRecord, ...]
    called: frozenset[int]
    seen: tuple[tuple[tuple, ModuleRecord], ...]
    children: tuple[Unit, ...]  # the calls it completed itself, in order

    @property
    def analysed(self) -> bool:
        return bool(self.records) and self.records[0] is self.record


@dataclass
class _Frame:
    module: nn.Module | None  # None: the top level
    records: int  # len(analysis.records) when the call began
    seen: int  # len(seen) then (both keep their order: what a call adds comes last)
    called: int  # len(analysis.called) then
    units: list[Unit] = field(default_factory=list)


class CallTrail:
    """The calls of one analysis, as a stack of running calls with the units each completed."""

    def __init__(self) -> None:
        self._stack: list[_Frame] = [_Frame(None, 0, 0, 0)]  # the top level: the model's own code
        self.frontier: tuple[Unit, ...] | None = None  # set by freeze()
        self.failing: tuple[nn.Module, ...] = ()  # the modules whose calls were running then, outermost first

    def begin(self, analysis: Analysis, seen: dict[tuple, ModuleRecord], module: nn.Module) -> None:
        self._stack.append(_Frame(module, len(analysis.records), len(seen), len(analysis.called)))

    def end(self, analysis: Analysis, seen: dict[tuple, ModuleRecord], module: nn.Module, key: tuple) -> None:
        """The call begun last completed (``seen[key]`` answers it)."""
        frame = self._stack.pop()
        record = seen.get(key)
        if record is None:
            return  # forgotten: its caller runs it unobserved
        self._stack[-1].units.append(
            Unit(
                module,
                key,
                record,
                tuple(analysis.records[frame.records :]),
                frozenset(islice(analysis.called, frame.called, None)),
                tuple(islice(seen.items(), frame.seen, None)),
                tuple(frame.units),
            )
        )

    def abandon(self) -> None:
        """The call begun last raised."""
        self._stack.pop()

    def freeze(self) -> None:
        """Keep the units of the calls running now (the first time only)."""
        if self.frontier is None:
            self.frontier = tuple(unit for frame in self._stack for unit in frame.units)
            self.failing = tuple(frame.module for frame in self._stack if frame.module is not None)
