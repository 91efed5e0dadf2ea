"""Leave a model exactly as it was after running it: tensor values, module attributes, RNG states.

plan() is a dry run and a failed inject changes nothing, yet both run the user's forward, which may
update buffers (a step counter, a cache), set Python attributes or draw random numbers. Inside
``preserved(model)`` every such change is taken back on exit:

- tensors: copy on first write. A dispatch mode sees every aten op; before the first op that writes
  into the storage of one of the model's tensors (parameters, buffers, tensor attributes), that
  tensor is cloned. Memory is what the forward writes (usually a few counters), not a second copy
  of the weights, and reads cost nothing but the dispatch. ``tensor._version`` alone would say
  *what* was written, not the old values; a full copy up front would double the model's memory.
- every module's class and ``__dict__`` (attributes, and the contents of dict/list/set attributes: caches,
  the submodule, parameter and buffer tables), restored in place so references stay valid;
- the random states of torch (CPU, and CUDA once initialised) and of Python's ``random``.

Objects nested deeper inside attributes (an attribute's own attributes) are not tracked.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

_CONTAINERS = (dict, list, set)


def storage_key(tensor: torch.Tensor) -> int | None:
    if tensor.is_meta or (type(tensor) is not torch.Tensor and not isinstance(tensor, nn.Parameter)):
        return None
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, wrappers)
        return None


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        values = [*module._parameters.values(), *module._buffers.values(), *module.__dict__.values()]
        for value in values:
            if isinstance(value, torch.Tensor) and not is_lazy(value):
                seen.setdefault(id(value), value)
    return list(seen.values())


def written_tensors(func: Any, args: tuple, kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The tensors an aten op writes into (its mutable arguments)."""
    if not (isinstance(func, torch._ops.OpOverload) and func._schema.is_mutable):
        return
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        for tensor in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(tensor, torch.Tensor):
                yield tensor


def storage_keys(tensors: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """The tensors by the storage they live in (tensors without one, meta ones included, left out)."""
    by_storage: dict[int, list[torch.Tensor]] = {}
    for tensor in tensors:
        key = storage_key(tensor)
        if key is not None:
            by_storage.setdefault(key, []).append(tensor)
    return by_storage


class _CopyOnWrite(TorchDispatchMode):
    """Clones a tracked tensor before the first op that writes into its storage."""

    supports_higher_order_operators = True  # torch.cond & co. run as they are (writes inside are not seen)

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.by_storage = storage_keys(tensors)
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, old value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.by_storage:
            for tensor in written_tensors(func, args, kwargs):
                self._save(tensor)
        return func(*args, **kwargs)

    def _save(self, written: torch.Tensor) -> None:
        key = storage_key(written)
        for tensor in self.by_storage.pop(key, ()) if key is not None else ():
            self.saved[id(tensor)] = (tensor, tensor.detach().clone())


def rng_states() -> tuple:
    """The random states of torch (CPU, and CUDA once initialised) and of Python's ``random``."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), random.getstate(), cuda


def set_rng_states(states: tuple) -> None:
    torch.random.set_rng_state(states[0])
    random.setstate(states[1])
    if states[2] is not None:
        torch.cuda.set_rng_state_all(states[2])


def same_rng(a: tuple, b: tuple) -> bool:
    cuda_same = (a[2] is None) == (b[2] is None) and all(torch.equal(x, y) for x, y in zip(a[2] or (), b[2] or ()))
    return torch.equal(a[0], b[0]) and a[1] == b[1] and cuda_same


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's write counter (None for an inference tensor, which has none)."""
    return None if tensor.is_inference() else tensor._version


class _Snapshot:
    def __init__(self, model: nn.Module):
        self.modules = list(model.modules())
        self.classes = [type(m) for m in self.modules]  # lazy modules change class on their first call
        self.dicts = [dict(m.__dict__) for m in self.modules]
        self.contents = [
            {
                k: (v, type(v)(v.items()) if isinstance(v, dict) else type(v)(v))
                for k, v in d.items()
                if type(v) in _CONTAINERS
            }
            for d in self.dicts
        ]
        self.tensors = model_tensors(model)
        self.versions = {id(t): _version(t) for t in self.tensors}
        self.rng = rng_states()

    def restore(self, copies: _CopyOnWrite) -> None:
        for tensor, old in copies.saved.values():
            with torch.inference_mode() if tensor.is_inference() else torch.no_grad():
                tensor.copy_(old)
        missed = [t for t in self.tensors if _version(t) != self.versions[id(t)] and id(t) not in copies.saved]
        if missed:
            log.warning("%d tensor(s) were changed in a way attn_inject could not undo", len(missed))
        for module, cls, saved, contents in zip(self.modules, self.classes, self.dicts, self.contents):
            if type(module) is not cls:
                module.__class__ = cls
            for key in [k for k in module.__dict__ if k not in saved]:
                del module.__dict__[key]
            module.__dict__.update(saved)
            for container, items in contents.values():
                container.clear()
                container.update(items) if isinstance(container, (dict, set)) else container.extend(items)
        set_rng_states(self.rng)


@dataclass
class Seen:
    """What ``preserved`` saw the body write: the model's tensors (under the copy-on-write watch;
    None where the body ran without it)."""

    writes: tuple[torch.Tensor, ...] | None = None


@contextmanager
def preserved(model: nn.Module, writes: Collection[torch.Tensor] | None = None) -> Iterator[Seen]:
    """Run the body, then put ``model`` (and the RNG states) back exactly as they were.

    ``writes``: the model's tensors the body is known to write into, when that is known (an earlier
    run of the same forward saw every op: the analysis, on the meta device or under this watch).
    Then those and every tensor that is not a parameter (buffers, tensor attributes: small) are
    copied up front and the body runs without the copy-on-write dispatch mode, which costs a fifth
    of a forward; a parameter written all the same would be reported as not taken back, as a write
    the dispatch mode cannot see is. Without ``writes``, the yielded ``Seen`` tells on exit which
    tensors the body wrote into.
    """
    snapshot = _Snapshot(model)
    copies = _CopyOnWrite(snapshot.tensors if writes is None else [])
    if writes is not None:
        parameters = {id(p) for p in model.parameters()}
        up_front = [t for t in snapshot.tensors if id(t) not in parameters]
        for tensor in [*up_front, *writes]:
            copies.saved[id(tensor)] = (tensor, tensor.detach().clone())
    seen = Seen()
    try:
        with copies if writes is None else nullcontext():
            yield seen
    finally:
        if writes is None:
            seen.writes = tuple(tensor for tensor, _ in copies.saved.values())
        snapshot.restore(copies)
