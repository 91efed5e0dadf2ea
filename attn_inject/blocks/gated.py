"""The gated wrapper: a block that is not the identity at init made one, ``y = x + alpha * (f(x) - x)``.

``alpha`` is one learned scalar that starts at 0 (ReZero, Bachlechner et al. 2020; LayerScale,
Touvron et al. 2021, with one value instead of one per channel). Parameter-free blocks (SimAM,
gather-excite θ⁻) have no last layer to zero, and a user's block may compute anything at init;
through the wrapper both start as the identity and ``alpha`` learns how much of them to use.

Exactness: with ``alpha = 0`` the sum is ``x + 0 * d``, ``d = f(x) - x``; ``0 * d`` is a zero, so
the result equals ``x`` in every floating point format, provided ``d`` is finite (an infinite or NaN
``f(x)`` would give NaN). A zero input of negative sign may come back as a positive zero (equal in
value; ``torch.equal`` holds); every other value keeps its bits. ``inject`` verifies the identity
on the example input like for every block.

Training: at step 0 only ``alpha`` gets a gradient (``sum(grad * d)``); the wrapped block's own
parameters get theirs once ``alpha`` moves. That is the price of a block with no last layer to
zero; blocks that have one (SE, ECA, CBAM, CA, GC, GE with parameters) use it instead.

``init="paper"`` builds no ``alpha``: the block is the bare ``f``, as its paper has it.

``register_block(name, identity="gate")`` registers ``gated_class(name, cls)``: a class whose
options are ``cls``'s (less its own ``init``, if any) plus ``init``, holding ``cls`` as ``block``.
The class lives in this module under ``Gated_<name>`` so pickles can name it.
"""

from __future__ import annotations

import inspect
import sys
import typing
from typing import Any

import torch
from torch import nn

from .gate import gate_gain


def gated_residual(x: torch.Tensor, fx: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``x + alpha * (fx - x)``: exactly ``x`` (in value) at ``alpha = 0`` for a finite ``fx``."""
    return torch.addcmul(x, alpha, fx - x)


class Gated(nn.Module):
    """``y = x + alpha * (block(x) - x)``, ``alpha`` a learned scalar, 0 at ``init="identity"``."""

    wrapped: type[nn.Module] = nn.Identity

    def __init__(self, channels: int, *args: Any, init: str = "identity", **options: Any):
        super().__init__()
        gate_gain(init)  # checks the name
        self.init = init
        self.block = self.wrapped(channels, *args, **options)
        self.alpha = nn.Parameter(torch.zeros(())) if init == "identity" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fx = self.block(x)
        return fx if self.alpha is None else gated_residual(x, fx, self.alpha)

    def extra_repr(self) -> str:
        return f"init={self.init!r}"


def gated_class(name: str, cls: type[nn.Module]) -> type[Gated]:
    """The registered class of ``register_block(name, identity="gate")(cls)``."""
    params = [p for p in inspect.signature(cls).parameters.values() if p.name != "init"]
    init_param = inspect.Parameter("init", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="identity")
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        hints = {k: v for k, v in typing.get_type_hints(cls.__init__).items() if k != "init"}
    except Exception:  # unresolvable annotations: the options go unchecked, as for any block
        hints = {}

    def __init__(self: Gated, channels: int, *args: Any, init: str = "identity", **options: Any) -> None:
        Gated.__init__(self, channels, *args, init=init, **options)

    __init__.__signature__ = inspect.Signature([self_param, *params, init_param])  # type: ignore[attr-defined]
    __init__.__annotations__ = {**hints, "init": str}
    qualname = f"Gated_{name}"
    __init__.__qualname__ = f"{qualname}.__init__"
    namespace = {"__init__": __init__, "wrapped": cls, "__module__": __name__, "__qualname__": qualname}
    new = type(qualname, (Gated,), {**namespace, "__doc__": cls.__doc__})
    setattr(sys.modules[__name__], qualname, new)
    return new


def forget_gated(cls: type[nn.Module]) -> None:
    """Drop a class made by ``gated_class`` from this module (its block was unregistered)."""
    module = sys.modules[__name__]
    if issubclass(cls, Gated) and getattr(module, cls.__qualname__, None) is cls:
        delattr(module, cls.__qualname__)
