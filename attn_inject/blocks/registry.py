"""Block registry: a plain dict from name to class, filled by the @register_block decorator."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from ..errors import AttnInjectError

_BLOCKS: dict[str, type[nn.Module]] = {}


def register_block(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register an attention block class under ``name``.

    The class takes ``channels`` as its first argument and ``init`` ("identity" or "paper") as a
    keyword; with ``init="identity"`` a freshly built block must return its input unchanged.
    """

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _BLOCKS and _BLOCKS[name] is not cls:
            raise AttnInjectError(f"block name {name!r} is already registered to {_BLOCKS[name].__name__}")
        _BLOCKS[name] = cls
        return cls

    return add


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


def block_options(name: str) -> dict[str, Any]:
    """The keyword options a block accepts (besides ``channels``), with their defaults."""
    params = inspect.signature(get_block(name)).parameters
    return {k: p.default for k, p in params.items() if k != "channels"}


def check_block_options(name: str, options: dict[str, Any]) -> None:
    """Raise if ``options`` holds a keyword the block does not take."""
    valid = block_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise AttnInjectError(
            f"block {name!r} has no option {', '.join(map(repr, unknown))}",
            hint=f"Its options: {', '.join(valid)}.",
        )


def is_attention_block(module: nn.Module) -> bool:
    """True for an instance of a registered block (these are leaves of every traced graph)."""
    return type(module) in _BLOCKS.values()
