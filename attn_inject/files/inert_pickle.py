"""Reading a checkpoint that pickles whole objects (an ultralytics .pt holds the model itself) as data.

``torch.load(weights_only=True)`` refuses such a file at its first class. Here the file is still
read by torch's weights-only unpickler, with every class or function it names outside torch's own
allowlist standing for an :class:`Inert` object of our own: instead of importing and calling what
the file names, the unpickler records the name, the arguments it would have been called with and
the state it would have been given. Nothing named by the file is imported, called or constructed.
Tensors and plain containers come back as themselves, so a pickled ``nn.Module`` reads as a tree of
Inert objects whose state holds ``_parameters``, ``_buffers`` and ``_modules``: ``module_state``
turns it into the ``state_dict`` the module had.

What the weights-only unpickler cannot read even so (it fills only plain dicts and lists, so an
object of a dict or list subclass fails) is refused as unreadable.

A pickle stores an object once and refers to it wherever it appears again, so a few KB can describe
a module holding its child twice, which holds its own twice, 40 levels down: 2**40 paths to the
bottom, or a module that holds itself. ``module_state`` follows every path (a module shared by two
parents is in the state_dict under both names, as ``state_dict()`` has it), so it bounds what it
walks and builds: at most ``MAX_MODULE_PATHS`` module visits (timm's largest models have a few
thousand modules, a YOLO a few hundred), keys of at most ``MAX_KEY_CHARS`` and ``MAX_TENSORS``
tensors (the bound of the .safetensors reader).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.serialization

from ..errors import AttnInjectError, one_line
from ..safe_read import check_unpacks_within
from .container import MAX_TENSORS

MAX_MODULE_PATHS = 100_000  # modules of a pickled model counted once per path to them (see above)
MAX_KEY_CHARS = 1_024  # a state_dict key's module path (timm's longest are about 100)


class Inert:
    """What a pickle would have built by calling ``name(*args)`` and setting ``state`` on it."""

    name = "?"  # the global the pickle names, "module.qualname"
    args: tuple
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        self = object.__new__(cls)
        self.args = args
        self.state = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ kept the arguments

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def attributes(self) -> dict[str, Any]:
        """The instance attributes it would have had (a plain object's pickled state)."""
        state = self.state[0] if isinstance(self.state, tuple) and len(self.state) == 2 else self.state
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<inert {self.name}>"


def globals_named(path: str | os.PathLike) -> list[str]:
    """The classes and functions a checkpoint's pickle names beyond torch's weights-only allowlist."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as exc:  # not a zip checkpoint of torch.save, or damaged
        raise AttnInjectError(
            f"not a checkpoint torch.save wrote ({one_line(exc)})",
            where=str(path),
            hint="The file is truncated or damaged, or not a PyTorch checkpoint; get it again.",
        ) from None


def read_inert(path: str | os.PathLike) -> Any:
    """The checkpoint's content with every named class or function an Inert stand-in (see above)."""
    path = Path(path)
    check_unpacks_within(path, "the checkpoint")  # torch unpacks the whole archive, the pickle first
    stand_ins: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (type(name.rpartition(".")[2], (Inert,), {"name": name}), name) for name in globals_named(path)
    ]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler refused an opcode on an object, or the file is damaged
        found = re.search(r"got <class '[^']*\.(\w+)'>", str(exc))
        raise AttnInjectError(
            "the checkpoint holds objects that cannot be read as data"
            + (f" (a {found.group(1)} filled like a dict or list)" if found else f" ({one_line(exc)})"),
            where=str(path),
            hint="Save the model's state_dict() (tensors only) and pass that file with --arch.",
        ) from None


def module_state(module: Inert, where: str | os.PathLike = "") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a pickled ``nn.Module`` read inertly: parameters and persistent buffers,
    under every path to them, within the bounds above (module paths, key length, tensors)."""
    state: dict[str, torch.Tensor] = {}
    stack, visits = [(module, "")], 0
    while stack:
        current, prefix = stack.pop()
        visits += 1
        if visits > MAX_MODULE_PATHS:
            raise _too_large(f"more than {MAX_MODULE_PATHS:,} modules counted once per path to them", where)
        if len(prefix) > MAX_KEY_CHARS:
            raise _too_large(f"a module path of more than {MAX_KEY_CHARS:,} characters", where)
        attributes = current.attributes()
        for name, value in (attributes.get("_parameters") or {}).items():
            if isinstance(value, torch.Tensor):
                state[prefix + name] = value.detach()
        transient = attributes.get("_non_persistent_buffers_set") or set()
        for name, value in (attributes.get("_buffers") or {}).items():
            if isinstance(value, torch.Tensor) and name not in transient:
                state[prefix + name] = value
        if len(state) > MAX_TENSORS:
            raise _too_large(f"more than {MAX_TENSORS:,} tensors", where)
        children = [(c, f"{prefix}{n}.") for n, c in (attributes.get("_modules") or {}).items() if isinstance(c, Inert)]
        stack += reversed(children)  # depth first, in order: state_dict's key order
    return state


def _too_large(what: str, where: str | os.PathLike) -> AttnInjectError:
    return AttnInjectError(
        f"the pickled model has {what} (its modules may hold the same children along very many paths, "
        "or themselves); attn_inject reads no more",
        where=str(where) or None,
        hint="Save the model's state_dict() (tensors only) and pass that file with --arch.",
    )
