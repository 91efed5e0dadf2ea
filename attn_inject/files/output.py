"""Atomic output: writing files without ever losing data.

``check_output`` runs before any work: the output is never one of the inputs (same path, or the
same file through a link), an existing file is kept unless ``force``, and the folder must exist and
be writable. ``atomic_write`` writes into a temporary file in the same folder, flushes it to disk
and renames it into place, so a failed or interrupted run leaves neither a partial nor a temporary
file (a failed write, Ctrl-C, and SIGTERM/SIGHUP, which the CLI turns into Ctrl-C, remove it).

A process killed outright (SIGKILL, the OOM killer, a power cut) cannot clean up: its temporary file
is named ``.NAME.attn-inject-tmp-HOST-PID-START-XXXXXXXX.SUFFIX``, with the host name, process id
and start time of the process writing it, and every later run on the same host that writes into
that folder (``check_output`` and ``atomic_write``) removes those whose process no longer runs.
Another run's live file is kept, and so is any file of another host (a shared folder: its process
cannot be seen from here).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import AttnInjectError

log = logging.getLogger(__name__)

MARK = "attn-inject-tmp"
_TEMPORARY = re.compile(rf"^\..*\.{MARK}-([A-Za-z0-9]+)-(\d+)-(\d+)-[a-z0-9_]+(\.[^.]*)?$")


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
    remove_stale_temporaries(folder)
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

    The temporary file keeps ``path``'s suffix, so ``write`` may read it back to check it. Any failure
    or interrupt removes it; an OSError (a full disk, a lost mount) becomes an AttnInjectError.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    remove_stale_temporaries(folder)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.{_own_mark()}-", suffix=path.suffix, dir=folder)
    except OSError as exc:
        raise AttnInjectError(f"cannot write in the output folder: {exc.strerror}", where=str(folder)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the mode of an ordinary new file
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise AttnInjectError(f"cannot write the output: {exc.strerror or exc}", where=str(path)) from None
        raise
    _fsync_folder(folder)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def remove_stale_temporaries(folder: str | Path) -> list[str]:
    """Remove the temporary files attn_inject runs left in ``folder`` when they were killed (their
    process no longer runs); returns their names. Nothing else is touched."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        if match.group(1) != host() or _running(int(match.group(2)), int(match.group(3))):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.name)
    if removed:
        log.info("removed %d temporary file(s) left in %s by killed runs: %s", len(removed), folder, ", ".join(removed))
    return removed


def _own_mark() -> str:
    pid = os.getpid()
    return f"{MARK}-{host()}-{pid}-{process_start(pid) or 0}"


def host() -> str:
    """This machine's name as it appears in temporary file names (letters and digits only)."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _running(pid: int, start: int) -> bool:
    """Whether the process that wrote a temporary file (``pid``, started at ``start``) still runs."""
    now = process_start(pid)
    return now is not None and (start == 0 or now in (0, start))


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, from /proc), None if no such process runs,
    0 where the platform does not tell (then only whether the pid runs is known)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return None
    except OSError:  # it exists, owned by someone else
        return 0
    return 0


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
