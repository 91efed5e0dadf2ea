"""Block registry: a plain dict from name to class, filled by the @register_block decorator.

The block contract, checked at registration:

- a ``torch.nn.Module`` subclass whose ``__init__`` takes ``channels`` first, then keyword options
  that all have defaults, one of them ``init`` ("identity" | "paper");
- ``forward(x)`` takes an NCHW map and returns one of the same shape, dtype and device;
- built with ``init="identity"`` it returns its input unchanged, bit for bit (``inject`` verifies it);
- ``fresh_output=True`` (the built-in blocks) promises that forward returns a new tensor that its
  backward does not need, so the residual add after it may write into it; otherwise the add is
  out of place (a block returning ``x`` itself still trains).

Option values are checked against ``__init__``'s annotations (``int``, ``float``, ``str``, ``bool``,
``X | None``) before the block is built: bools are not numbers, floats are finite.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from typing import Any, Callable

import torch
from torch import nn

from ..errors import AttnInjectError

_BLOCKS: dict[str, type[nn.Module]] = {}
_FRESH_OUTPUT: set[type[nn.Module]] = set()


def register_block(name: str, *, fresh_output: bool = False) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register an attention block class under ``name`` (see the module docstring for the contract)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise AttnInjectError(
            f"register_block: name must be a string usable as a submodule name, not {name!r}",
            hint="For example register_block('cbam').",
        )

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        _check_contract(name, cls)
        if name in _BLOCKS and _BLOCKS[name] is not cls:
            raise AttnInjectError(f"block name {name!r} is already registered to {_BLOCKS[name].__name__}")
        _BLOCKS[name] = cls
        if fresh_output:
            _FRESH_OUTPUT.add(cls)
        return cls

    return add


def _check_contract(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise AttnInjectError(f"register_block({name!r}) needs a torch.nn.Module subclass, not {cls!r}")
    params = list(inspect.signature(cls).parameters.values())
    problem = None
    if not params or params[0].name != "channels" or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        problem = "its __init__ must take channels as the first argument"
    elif "init" not in {p.name for p in params}:
        problem = "its __init__ must take an init option ('identity' | 'paper')"
    elif any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[1:]):
        problem = "every option after channels needs a default"
    if problem:
        raise AttnInjectError(f"register_block({name!r}): {cls.__name__} breaks the block contract: {problem}",
                              hint="See attn_inject.blocks.registry for the contract.")  # fmt: skip


def list_blocks() -> list[str]:
    """Names of the registered attention blocks, sorted."""
    return sorted(_BLOCKS)


def get_block(name: str) -> type[nn.Module]:
    """The block class registered as ``name``; an unknown name lists the valid ones."""
    try:
        return _BLOCKS[name]
    except (KeyError, TypeError):
        raise AttnInjectError(
            f"unknown block {name!r}", hint=f"Valid blocks: {', '.join(list_blocks())}."
        ) from None


def returns_fresh_output(block: nn.Module) -> bool:
    """Whether ``block``'s output may be written in place (registered with ``fresh_output=True``)."""
    return type(block) in _FRESH_OUTPUT


def block_options(name: str) -> dict[str, Any]:
    """The keyword options a block accepts (besides ``channels``), with their defaults."""
    params = inspect.signature(get_block(name)).parameters
    return {k: p.default for k, p in params.items() if k != "channels"}


def check_block_options(name: str, options: dict[str, Any]) -> None:
    """Raise if ``options`` holds a keyword the block does not take, a value of the wrong type, or
    one the block refuses (it is built once on the meta device, which allocates nothing)."""
    valid = block_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise AttnInjectError(
            f"block {name!r} has no option {', '.join(map(repr, unknown))}",
            hint=f"Its options: {', '.join(valid)}.",
        )
    types_of = _option_types(get_block(name))
    for key, value in options.items():
        allowed = types_of.get(key)
        if allowed is not None and not _is_instance(value, allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise AttnInjectError(
                f"block {name!r}: option {key}={value!r} must be {names}, not {type(value).__name__}",
                hint=f"Its options and defaults: {valid}.",
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise AttnInjectError(f"block {name!r}: option {key}={value!r} must be a finite number", hint=f"Its options and defaults: {valid}.")
    try:
        with torch.device("meta"):
            get_block(name)(8, **options)
    except AttnInjectError:
        raise
    except Exception as exc:  # the block's own checks, or maths on a bad value
        raise AttnInjectError(
            f"block {name!r} refuses options {options}: {type(exc).__name__}: {exc}",
            hint=f"Its options and defaults: {valid}.",
        ) from None


def _option_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Option name -> the types its annotation allows (only plain types and unions of them)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: no type checks
        return {}
    allowed = {}
    for key, hint in hints.items():
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
        if all(isinstance(t, type) for t in members):
            allowed[key] = tuple(members)
    return allowed


def _is_instance(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


def is_attention_block(module: nn.Module) -> bool:
    """True for an instance of a registered block (these are leaves of every traced graph)."""
    return type(module) in _BLOCKS.values()
