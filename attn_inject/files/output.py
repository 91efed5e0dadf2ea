"""Atomic output: writing files without ever losing data.

``check_output`` runs before any work: the output is never one of the inputs (same path, or the
same file through a link), an existing file is kept unless ``force``, and the folder must exist and
be writable. ``atomic_write`` writes into a temporary file in the same folder, flushes it to disk
and renames it into place, so a failed or interrupted run leaves neither a partial nor a temporary
file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import AttnInjectError


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> Path:
    """The output path, after refusing anything that could overwrite an input or an existing file."""
    path = Path(out).expanduser()
    for source in inputs:
        source = Path(source).expanduser()
        if path.resolve() == source.resolve() or (path.exists() and source.exists() and os.path.samefile(path, source)):
            raise AttnInjectError("the output is the input file", where=str(path), hint="Choose another --output path.")
    if path.is_dir():
        raise AttnInjectError(
            "the output is a folder", where=str(path), hint="Give a file name, e.g. model.safetensors."
        )
    if path.exists() and not force:
        raise AttnInjectError(
            "the output file exists", where=str(path), hint="Pass --force (force=True) to replace it."
        )
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise AttnInjectError("the output folder does not exist", where=str(folder), hint="Create it first.")
    try:  # a real probe: permissions alone do not tell (root, read-only mounts)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        raise AttnInjectError(
            "the output folder is not writable", where=str(folder), hint="Choose a folder you can write to."
        ) from None
    return path


def check_safetensors_output(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False
) -> Path:
    """``check_output`` for a .safetensors file (the only kind attn_inject writes models as)."""
    path = check_output(out, inputs, force)
    if path.suffix != ".safetensors":
        raise AttnInjectError(
            "the output must be a .safetensors file", where=str(path), hint="Name it NAME.safetensors."
        )
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``.

    The temporary file keeps ``path``'s suffix, so ``write`` may read it back to check it.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=folder)
    except OSError as exc:
        raise AttnInjectError(f"cannot write in the output folder: {exc.strerror}", where=str(folder)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the mode of an ordinary new file
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise AttnInjectError(f"cannot write the output: {exc.strerror or exc}", where=str(path)) from None
        raise
    _fsync_folder(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
