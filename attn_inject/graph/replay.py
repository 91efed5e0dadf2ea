"""Outputs kept from the reference forward for the analysis' re-run on real tensors.

When the meta run needed values part-way (call_trail.py), the re-run on real tensors need not
compute everything again. The reference forward, which verification runs anyway, runs first with
forward hooks that keep calls' arguments and outputs:

- the frontier's: the calls the meta run completed around the failing one (a detector's backbone).
  The re-run adopts their records from the meta run and takes their outputs;
- once the innermost failing module is called, every later call of a module that is not itself
  failing (a detector's box and mask heads) and not inside a frontier call, up to a budget of bytes
  (``budget``: the kept outputs' size; their arguments are mostly outputs kept too). The re-run,
  meeting such a call, analyses it on the meta device (meta_run.py) and takes its output; where
  that meta run needs values too, the call is analysed on real tensors and its own calls are met
  in the same way.

A kept output is handed out only for a call whose arguments equal the kept call's bit for bit. Only
calls whose arguments and outputs are tensors and plain values (in lists, tuples and dicts) are
kept, so that each tensor's write counter can be checked: a kept tensor written into after it was
kept (by a later in-place op of the forward) is never handed out, and that call is computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .call_trail import Unit
from .example import bitwise_equal
from .nodes import is_primitive

_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)
MIN_BUDGET = 256 << 20  # bytes of kept outputs after the failure: the model's own size, at least this


@dataclass
class _Kept:
    leaves: list[Any]  # the call's (args, kwargs), flattened
    spec: pytree.TreeSpec
    out: Any
    versions: list[tuple[torch.Tensor, int]]  # every tensor of the arguments and output, as kept
    used: bool = False

    def unchanged(self) -> bool:
        return all(t._version == v for t, v in self.versions)

    def matches(self, leaves: list[Any], spec: pytree.TreeSpec) -> bool:
        return spec == self.spec and all(_same(a, b) for a, b in zip(leaves, self.leaves))


class Replay:
    """Kept outputs of ``forward`` calls, by module; the frontier's units that answer for theirs."""

    def __init__(self, model: nn.Module, frontier: Sequence[Unit], failing: Sequence[nn.Module]):
        self.units: dict[tuple, Unit] = {}
        for unit in frontier:  # a key's analysed unit wins over its repeats
            if unit.key not in self.units or unit.analysed:
                self.units[unit.key] = unit
        self._frontier = {id(u.module) for u in frontier if u.key[1] == "forward"}
        self._failing = {id(m) for m in failing}
        self._last_failing = failing[-1] if failing else None
        self._after = not failing  # the failure was in the model's own code: everything is after it
        # frontier calls running (the calls inside them are not kept: theirs is); one that raised
        # (and the model caught) is never left: nothing more is kept, as nothing it did is known
        self._inside = 0
        tensors = [*model.parameters(), *model.buffers()]
        self.budget = max(MIN_BUDGET, sum(t.numel() * t.element_size() for t in tensors))
        self._modules = {
            id(m): m
            for m in model.modules()
            if id(m) in self._frontier or not (id(m) in self._failing or is_primitive(m))
        }
        self._kept: dict[int, list[_Kept]] = {}
        self.handed: list[str] = []  # the paths of the calls whose kept outputs the re-run took, in order

    @contextmanager
    def keeping(self) -> Iterator[None]:
        """Keep the calls made in the body (the reference forward)."""
        handles = [
            module.register_forward_hook(partial(self._keep, key), with_kwargs=True)
            for key, module in self._modules.items()
        ]
        handles += [self._modules[key].register_forward_pre_hook(self._entered) for key in self._frontier]
        if self._last_failing is not None:
            handles.append(self._last_failing.register_forward_pre_hook(self._failing_called))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def keeps(self, module: nn.Module) -> bool:
        """Some call of ``module`` was kept."""
        return bool(self._kept.get(id(module)))

    def _failing_called(self, *_: Any) -> None:
        self._after = True

    def _entered(self, *_: Any) -> None:
        self._inside += 1

    def _keep(self, key: int, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if key in self._frontier:
            self._inside -= 1
        elif self._inside or not self._after:
            return
        leaves, spec = pytree.tree_flatten((args, kwargs))
        values = [*leaves, *pytree.tree_leaves(out)]
        tensors = [t for t in values if isinstance(t, torch.Tensor)]
        if not all(map(_keepable, values)) or any(t.is_inference() for t in tensors):
            return
        if key not in self._frontier:
            size = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            if size > self.budget:
                return
            self.budget -= size
        self._kept.setdefault(key, []).append(_Kept(leaves, spec, out, [(t, t._version) for t in tensors]))

    def take(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any] | None:
        """The kept output of a call of ``module`` with these arguments, as a 1-tuple; None if none."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        for kept in self._kept.get(id(module), ()):
            if not kept.used and kept.unchanged() and kept.matches(leaves, spec):
                kept.used = True
                return (kept.out,)
        return None


def _keepable(value: Any) -> bool:
    return type(value) in (torch.Tensor, nn.Parameter) or type(value) in _PLAIN


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a is b or (a.device == b.device and bitwise_equal(a, b))
    return type(a) is type(b) and (a == b if type(a) is not float else a.hex() == b.hex())
