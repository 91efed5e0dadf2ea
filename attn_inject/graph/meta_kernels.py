"""Meta kernels remembered: an op's output shapes, strides and dtypes for the same kind of input.

On the meta device an op computes only its outputs' metadata, but many ops do so in Python (the
decompositions and references of ``torch._refs``): a batch norm, layer norm or hardswish costs
1.5-2.5 ms there, more than the real op on a small map. A model calls the same op on the same
shapes again and again (53 batch norms of ResNet-50 on a dozen shapes, identical transformer
blocks), so the first call's result metadata is kept and later calls return fresh empty tensors
with it, as ``FakeTensorMode``'s dispatch cache does for fake tensors.

Only what is safe to replay is kept: functional ops (no argument written, no output aliasing an
input) whose outputs are all plain tensors, called with arguments that are meta tensors or simple
values. The key holds each tensor's shape, strides, storage offset and dtype and each value with
its type (``1``, ``1.0`` and ``True`` differ; so do ``0.0`` and ``-0.0``). An op that raises is
never kept. The table is bounded and shared by the process (it depends on torch only).
"""

from __future__ import annotations

from typing import Any

import torch

META = torch.device("meta")
MAX_ENTRIES = 8192

_OutputMeta = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]
_SIMPLE = (type(None), bool, int, str, torch.dtype, torch.device, torch.layout, torch.memory_format)

_PLAIN = (torch.Tensor, torch.nn.Parameter)

_FUNCTIONAL, _IN_PLACE = "functional", "in place"
_kinds: dict[Any, str | None] = {}
_outputs: dict[tuple, tuple[bool, tuple[_OutputMeta, ...]]] = {}


def call_meta(func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)``, from the remembered metadata where the same call was seen before."""
    kind = _kind(func)
    key = None if kind is None else _key(func, args, kwargs)
    if key is None:
        return func(*args, **kwargs)
    known = _outputs.get(key)
    if known is not None:
        if kind == _IN_PLACE:
            return args[0]  # it succeeded before on a self of this metadata, which it does not change
        single, metas = known
        made = tuple(torch.empty_strided(shape, stride, dtype=dtype, device=META) for shape, stride, dtype in metas)
        return made[0] if single else made
    result = func(*args, **kwargs)
    outputs = (result,) if isinstance(result, torch.Tensor) else result
    if len(_outputs) >= MAX_ENTRIES:
        return result
    if kind == _IN_PLACE and result is args[0]:
        _outputs[key] = (True, ())
    elif kind == _FUNCTIONAL and isinstance(outputs, tuple) and all(_plain_meta(t) for t in outputs):
        metas = tuple((tuple(t.shape), t.stride(), t.dtype) for t in outputs)
        _outputs[key] = (isinstance(result, torch.Tensor), metas)
    return result


def _kind(func: Any) -> str | None:
    """How a call of ``func`` can be replayed: functional (no argument written, every output a
    fresh tensor), in place (writes its first argument only, returns it, keeps its metadata), or not."""
    if func in _kinds:
        return _kinds[func]
    kind = None
    if isinstance(func, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded not in func.tags:
        schema = func._schema
        returns, arguments = schema.returns, schema.arguments
        tensors_out = bool(returns) and all(isinstance(r.type, torch.TensorType) for r in returns)
        written = [a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write]
        first = arguments[0].alias_info if arguments else None
        if tensors_out and not schema.is_mutable and all(r.alias_info is None for r in returns):
            kind = _FUNCTIONAL
        elif (
            tensors_out
            and len(returns) == 1
            and written == [arguments[0].name]
            and first is not None
            and returns[0].alias_info is not None
            and returns[0].alias_info.before_set == first.before_set
            and torch.Tag.inplace_view not in func.tags
        ):
            kind = _IN_PLACE
    _kinds[func] = kind
    return kind


def _key(func: Any, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
    """The call's key, or None when an argument is not a meta tensor or a simple value."""
    parts = tuple(_part(value) for value in args)
    named = tuple((name, _part(value)) for name, value in kwargs.items())
    if any(part is None for part in parts) or any(part is None for _, part in named):
        return None
    return func, parts, named


def _part(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if not _plain_meta(value):
            return None
        return torch.Tensor, tuple(value.shape), value.stride(), value.storage_offset(), value.dtype
    if type(value) is float:
        return float, value.hex()
    if type(value) in _SIMPLE:
        return type(value), value
    if type(value) in (list, tuple):
        items = tuple(_part(v) for v in value)
        return None if any(item is None for item in items) else (type(value), items)
    return None


def _plain_meta(value: Any) -> bool:
    """A dense meta tensor or parameter (not a subclass with behaviour of its own)."""
    return type(value) in _PLAIN and value.device == META and value.layout == torch.strided
