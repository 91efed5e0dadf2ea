"""What a pickled checkpoint would import, read without unpickling it: the globals its pickles name.

Used only to explain why torch's safe reader (``torch.load(weights_only=True)``) refused a file: a
global outside torch's allowlist is a call the unpickler would make, so the file holds code, which
attn_inject never runs; a pickle naming only allowed globals was refused for its format (a protocol
the safe reader does not parse). The pickle is walked opcode by opcode (``pickletools.genops``),
nothing is executed, and at most MAX_SCAN_BYTES of it are looked at.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickletools
import zipfile
from dataclasses import dataclass

import torch

from ..errors import AttnInjectError
from ..safe_read import open_regular, read_exactly_at_most

MAX_SCAN_BYTES = 64 << 20
LEGACY_PICKLES = 5  # torch's legacy format: magic number, protocol, sys info, the object, storage keys
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
# timm's training checkpoints hold argparse.Namespace; its reader allows it, and so does this scan
_ALSO_ALLOWED = {"argparse.Namespace"}


@dataclass(frozen=True)
class PickleScan:
    """The globals a checkpoint's pickles name, and the highest pickle protocol they use."""

    globals: frozenset[str]
    protocol: int

    def code(self) -> list[str]:
        """The named globals torch's safe reader does not allow: calls the file would make."""
        return sorted(self.globals - allowed_globals())


def scan_checkpoint(path: str | os.PathLike) -> PickleScan | None:
    """Scan a torch checkpoint (zip or legacy format) without unpickling it; None if it is neither."""
    try:
        with open_regular(path, "the checkpoint") as handle:
            if zipfile.is_zipfile(handle):
                handle.seek(0)
                with zipfile.ZipFile(handle) as archive:
                    names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                    if not names or archive.getinfo(names[0]).file_size > MAX_SCAN_BYTES:
                        return None
                    return _scan(io.BytesIO(archive.read(names[0])), pickles=1)
            handle.seek(0)
            return _scan(io.BytesIO(read_exactly_at_most(handle, MAX_SCAN_BYTES)), pickles=LEGACY_PICKLES)
    except (OSError, zipfile.BadZipFile, AttnInjectError, RuntimeError, ValueError):
        return None


def _scan(stream: io.BytesIO, pickles: int) -> PickleScan | None:
    found: set[str] = set()
    protocol = -1
    for _ in range(pickles):
        recent: list[str | None] = []  # what each opcode pushed (a string, or None for anything else)
        memo: dict[int, str | None] = {}
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                if name == "PROTO":
                    protocol = max(protocol, int(str(arg)))
                elif name in ("GLOBAL", "INST"):
                    found.add(_python3(*str(arg).split(" ", 1)))
                elif name == "STACK_GLOBAL":
                    module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                    found.add(_python3(module, attr) if module and attr else "<a global built at load time>")
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name in _PUTS:
                    memo[int(str(arg))] = recent[-1] if recent else None
                elif name in _GETS:
                    recent.append(memo.get(int(str(arg))))
                elif name in _STRINGS:
                    recent.append(str(arg))
                elif name not in ("FRAME", "STOP"):
                    recent.append(None)
                del recent[:-2]
        except (ValueError, EOFError, RuntimeError, UnicodeDecodeError):
            break  # the end of the pickles (or a damaged one): report what was seen
    if protocol < 0 and not found:
        return None
    return PickleScan(frozenset(found), max(protocol, 0))


def _python3(module: str, name: str = "") -> str:
    """``module.name`` as Python 3 unpickles it (protocol 2 writes Python 2 names: ``__builtin__``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def allowed_globals() -> set[str]:
    """The globals ``torch.load(weights_only=True)`` accepts (torch's own list and any the user added)."""
    unpickler = getattr(torch, "_weights_only_unpickler", None)
    allowed = set(_ALSO_ALLOWED)
    for getter in ("_get_allowed_globals", "_get_user_allowed_globals"):
        if unpickler is not None and hasattr(unpickler, getter):
            allowed |= set(getattr(unpickler, getter)())
    return allowed
