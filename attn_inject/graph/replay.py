"""The outputs of the frontier's calls, kept from the reference forward for the analysis' re-run.

When the meta run needed values, the calls it had completed around the failure's path (the
frontier, call_trail.py) need not be computed again: the reference forward, which verification
runs anyway, is watched with forward hooks on their modules that keep each call's arguments and
output. The re-run on real tensors, meeting such a call with arguments equal bit for bit to a kept
one, adopts the meta run's records and is handed the kept output instead of computing it.

Only calls whose arguments and outputs are tensors and plain values (in lists, tuples and dicts)
are kept, so that every tensor's write counter can be checked: a kept tensor written into after it
was kept (by a later in-place op of the forward) is never handed out, and the call is computed.
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

_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)


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
    """Kept outputs of the frontier's ``forward`` calls, by module; the units that answer for them."""

    def __init__(self, frontier: Sequence[Unit]):
        self.units: dict[tuple, Unit] = {}
        for unit in frontier:  # a key's analysed unit wins over its repeats
            if unit.key not in self.units or unit.analysed:
                self.units[unit.key] = unit
        self._modules = {id(u.module): u.module for u in frontier if u.key[1] == "forward"}
        self._kept: dict[int, list[_Kept]] = {key: [] for key in self._modules}
        self.handed: list[Unit] = []  # the units whose kept outputs the re-run took, in order

    @contextmanager
    def keeping(self) -> Iterator[None]:
        """Keep the frontier's calls made in the body (the reference forward)."""
        handles = [
            module.register_forward_hook(partial(self._keep, key), with_kwargs=True)
            for key, module in self._modules.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _keep(self, key: int, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        values = [*leaves, *pytree.tree_leaves(out)]
        tensors = [t for t in values if isinstance(t, torch.Tensor)]
        if all(map(_keepable, values)) and not any(t.is_inference() for t in tensors):
            self._kept[key].append(_Kept(leaves, spec, out, [(t, t._version) for t in tensors]))

    def take(self, module: nn.Module, unit: Unit, args: tuple, kwargs: dict) -> tuple[Any] | None:
        """The kept output of a call of ``module`` with these arguments, as a 1-tuple; None if none."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        for kept in self._kept.get(id(module), ()):
            if not kept.used and kept.unchanged() and kept.matches(leaves, spec):
                kept.used = True
                self.handed.append(unit)
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
