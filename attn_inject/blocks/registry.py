"""The block registry: a plain dict from name to a BlockSpec, filled by the @register_block decorator.

A BlockSpec holds everything the rest of the library knows about a block, so a user's block gets
exactly the built-ins' treatment: the layer feeding its gate (zeroed at the identity init, spared
from weight decay), whether its output is a fresh tensor (the residual add may then write into
it), the site facts it takes as options (``block_in_channels``, ``spatial_dims``), and the empty
attention slots of timm's residual blocks it may fill (``self.se = None``).

The block contract, checked at registration:

- a ``torch.nn.Module`` subclass whose ``__init__`` takes ``channels`` first, then keyword options
  that all have defaults, one of them ``init`` ("identity" | "paper");
- ``forward(x)`` takes a (B, C, *spatial) map and returns one of the same shape, dtype and device;
- a keyword ``spatial_dims: int = 2`` says it serves 1-, 2- and 3-D maps (NCL, NCHW, NCDHW): it
  pools over every spatial axis and builds layers of those dims (blocks/spatial.py), and raises
  AttnInjectError in ``__init__`` for dims it cannot serve; without it a block is 2-D only;
- built with ``init="identity"`` it returns its input unchanged, bit for bit (``inject`` verifies it);
- ``gate`` names the submodule whose output feeds the block's gate (SE ``fc2``, ECA ``conv``), or
  a parameter (GCT ``beta``), or a tuple of such names of which the built block holds at least one
  (CBAM's two gates; global context's ``mlp_scale.fc2`` or ``mlp_add.fc2``, by its options);
- ``fresh_output=True`` promises that forward returns a new tensor that its backward does not
  need, so the residual add after it may write into it; otherwise the add is out of place (a block
  returning ``x`` itself still trains).

A block that is not the identity at init (parameter-free SimAM; any user's block) is registered
with ``identity="gate"``: the registry then holds the gated wrapper of ``gated.py``,
``y = x + alpha * (f(x) - x)`` with a learned scalar ``alpha = 0``, whose options are the block's
plus ``init``; the block need not take ``init`` itself, and its gate is ``alpha``.

Option values are checked against ``__init__``'s annotations (``int``, ``float``, ``str``, ``bool``,
``X | None``) before the block is built: bools are not numbers, floats are finite.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import AttnInjectError, one_line
from .gated import forget_gated, gated_class

# Facts of a site that a block may take as constructor options; the plan fills them in.
# block_in_channels: the channels entering the matched branch or block; spatial_dims: 1, 2 or 3,
# the map's spatial axes (a block that takes it serves 1-D/3-D maps; one without it is 2-D only)
SITE_FACTS = ("block_in_channels", "spatial_dims")
DEFAULT_SLOTS = ("se",)  # timm's ResNet, Res2Net and SKNet blocks keep ``self.se = None``

ModuleType = TypeVar("ModuleType", bound=type[nn.Module])


@dataclass(frozen=True)
class BlockSpec:
    """What the library knows about one registered block."""

    name: str
    cls: type[nn.Module]
    gate: str | tuple[str, ...] | None = None  # layer(s) feeding the gate: zero at the identity init, no weight decay
    fresh_output: bool = False  # forward returns a new tensor its backward does not need
    site_facts: tuple[str, ...] = ()  # SITE_FACTS the constructor takes
    slots: tuple[str, ...] = DEFAULT_SLOTS  # empty attention attributes a branch_end block may take

    @property
    def gates(self) -> tuple[str, ...]:
        """The gate names as a tuple (none, one or several)."""
        return () if self.gate is None else (self.gate,) if isinstance(self.gate, str) else self.gate

    def gate_parameters(self, block: nn.Module) -> list[str]:
        """Names (inside ``block``) of the gate layers' parameters (of those the block holds)."""
        names: list[str] = []
        for gate in self.gates:
            path, found = _find(block, gate)
            if isinstance(found, nn.Module):
                names += [f"{path}.{n}" for n, _ in found.named_parameters()]
            elif found is not None:
                names.append(path)
        return names


def _find(block: nn.Module, name: str) -> tuple[str, nn.Module | nn.Parameter | None]:
    """The path and submodule or parameter ``name`` of ``block`` (a part ``-1`` is a Sequential's last
    child: the last norm of a variable-length stack); None if the block has none."""
    found: Any = block
    path = []
    for part in name.split("."):
        if part == "-1" and isinstance(found, nn.Sequential) and len(found):
            part = list(found._modules)[-1]
        found = getattr(found, part, None) if isinstance(found, nn.Module) else None
        path.append(part)
    return ".".join(path), found if isinstance(found, (nn.Module, nn.Parameter)) else None


_BLOCKS: dict[str, BlockSpec] = {}
_BY_CLASS: dict[type[nn.Module], BlockSpec] = {}


IDENTITIES = ("init", "gate")  # the block is the identity by its init | through the gated wrapper


def register_block(
    name: str,
    *,
    gate: str | tuple[str, ...] | None = None,
    fresh_output: bool = False,
    slots: tuple[str, ...] = DEFAULT_SLOTS,
    identity: str = "init",
) -> Callable[[ModuleType], ModuleType]:
    """Register an attention block class under ``name`` (see the module docstring for the contract)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise AttnInjectError(
            f"register_block: name must be a string usable as a submodule name, not {name!r}",
            hint="For example register_block('cbam').",
        )
    if identity not in IDENTITIES:
        raise AttnInjectError(
            f"register_block({name!r}): unknown identity {identity!r}",
            hint="identity='init': the block is the identity at init='identity'; "
            "'gate': wrap it in y = x + alpha * (f(x) - x).",
        )

    def add(cls: ModuleType) -> ModuleType:
        known = _BLOCKS.get(name)
        if known is not None and getattr(known.cls, "wrapped", known.cls) is not cls:
            raise AttnInjectError(f"block name {name!r} is already registered to {known.cls.__name__}")
        registered: type[nn.Module] = cls
        gates = BlockSpec(name, cls, gate).gates
        if identity == "gate":
            _check_module(name, cls)
            registered = known.cls if known is not None else gated_class(name, cls)
            gates = ("alpha", *(f"block.{g}" for g in gates))
        try:
            params = _check_contract(name, registered)
            site_facts = tuple(fact for fact in SITE_FACTS if fact in params)
            spec = BlockSpec(name, registered, _one_or_many(gates), fresh_output, site_facts, tuple(slots))
            _check_gate(spec)
        except AttnInjectError:
            if registered is not cls and known is None:
                forget_gated(registered)
            raise
        _BLOCKS[name] = _BY_CLASS[registered] = spec
        return cls

    return add


def _one_or_many(gates: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not gates else gates[0] if len(gates) == 1 else gates


def unregister_block(name: str) -> None:
    """Take a block out of the registry (a test's or a notebook's temporary block)."""
    spec = block_spec(name)
    del _BLOCKS[name]
    _BY_CLASS.pop(spec.cls, None)
    forget_gated(spec.cls)


@contextmanager
def registered_block(name: str, cls: type[nn.Module], **spec_options: Any) -> Iterator[type[nn.Module]]:
    """``register_block(name, **spec_options)(cls)`` for the duration of a ``with`` block."""
    register_block(name, **spec_options)(cls)
    try:
        yield cls
    finally:
        unregister_block(name)


def _check_module(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise AttnInjectError(f"register_block({name!r}) needs a torch.nn.Module subclass, not {cls!r}")


def _check_contract(name: str, cls: Any) -> dict[str, inspect.Parameter]:
    _check_module(name, cls)
    params = list(inspect.signature(cls).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    problem = None
    if not params or params[0].name != "channels" or params[0].kind not in positional:
        problem = "its __init__ must take channels as the first argument"
    elif "init" not in {p.name for p in params}:
        problem = "its __init__ must take an init option ('identity' | 'paper')"
    elif any(p.default is p.empty and p.kind not in variadic for p in params[1:]):
        problem = "every option after channels needs a default"
    if problem:
        raise AttnInjectError(
            f"register_block({name!r}): {cls.__name__} breaks the block contract: {problem}",
            hint="See attn_inject.blocks.registry for the contract.",
        )
    return {p.name: p for p in params}


def _check_gate(spec: BlockSpec) -> None:
    """A named gate must be a submodule or parameter of the block (built once, at 64 channels, on the
    meta device); of several names, one at least."""
    if spec.gate is None:
        return
    where = f"register_block({spec.name!r}, gate={spec.gate!r})"
    try:
        with torch.device("meta"):
            block = spec.cls(64)
    except Exception as exc:  # the user's constructor
        raise AttnInjectError(
            f"{where}: {spec.cls.__name__}(64) fails with its default options ({one_line(exc)})",
            hint="A registered block must build from channels alone.",
        ) from None
    if not any(_find(block, gate)[1] is not None for gate in spec.gates):
        raise AttnInjectError(
            f"{where}: {spec.cls.__name__} has no submodule {spec.gate!r} (nor a parameter of that name)",
            hint="gate names the submodule whose output feeds the block's gate, e.g. 'fc2'.",
        )


def list_blocks() -> list[str]:
    """Names of the registered attention blocks, sorted."""
    return sorted(_BLOCKS)


def block_spec(name: str) -> BlockSpec:
    """The spec registered as ``name``; an unknown name lists the valid ones."""
    try:
        return _BLOCKS[name]
    except (KeyError, TypeError):
        raise AttnInjectError(f"unknown block {name!r}", hint=f"Valid blocks: {', '.join(list_blocks())}.") from None


def get_block(name: str) -> type[nn.Module]:
    """The block class registered as ``name``; an unknown name lists the valid ones."""
    return block_spec(name).cls


def spec_of(module: nn.Module) -> BlockSpec | None:
    """The spec of a registered block's instance; None for any other module."""
    return _BY_CLASS.get(type(module))


def is_attention_block(module: nn.Module) -> bool:
    """True for an instance of a registered block (these are leaves of every traced graph)."""
    return type(module) in _BY_CLASS


def describe_block(name: str, channels: int = 256) -> dict[str, Any]:
    """One block for listings: its class, paper (its module's first docstring line), options with
    defaults, how it is the identity at insertion, gate layers and parameters at ``channels``."""
    spec = block_spec(name)
    own = getattr(spec.cls, "wrapped", spec.cls)
    module = inspect.getmodule(own)
    doc = own.__doc__ or (module.__doc__ if module is not None else None) or ""
    with torch.device("meta"):
        block = spec.cls(channels)
    return {
        "name": name,
        "class": f"{own.__module__}.{own.__qualname__}",
        "paper": doc.strip().split("\n")[0],
        "identity": "gate" if own is not spec.cls else "init",
        "gate": list(spec.gates),
        "options": block_options(name),
        "channels": channels,
        "parameters": sum(p.numel() for p in block.parameters()),
    }


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
            raise AttnInjectError(
                f"block {name!r}: option {key}={value!r} must be a finite number",
                hint=f"Its options and defaults: {valid}.",
            )
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
        hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    except Exception:  # unresolvable annotations: no type checks
        return {}
    allowed = {}
    for key, hint in hints.items():
        is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        members = typing.get_args(hint) if is_union else (hint,)
        if all(isinstance(t, type) for t in members):
            allowed[key] = tuple(members)
    return allowed


def _is_instance(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)
