"""Reading files from untrusted hands: only regular files are opened for reading, and never more bytes
are read than a bound, whatever the file's size claims.

``st_size`` is 0 for a character device or a FIFO, so a size check alone lets ``/dev/zero`` (read
without end) or a FIFO (a read that never returns) through. Files are opened non-blocking (opening a
FIFO returns at once), checked to be regular on the open descriptor (no race with a rename), and
read with an explicit limit.

A torch checkpoint is a zip archive that torch unpacks in full: ``torch.save`` stores its entries
as they are, but a zip may deflate them, and a file of 260 KB then asks for 256 MB (a few MB for
all the memory there is). ``check_unpacks_within`` refuses an archive whose entries add up to more
than ``MAX_UNPACKED`` times the file's size, from the zip's directory alone (the sizes torch
allocates), before torch reads it; weights deflate by a few percent, so a checkpoint re-packed by a
zip tool still reads.

Data a pickle hands back is a graph, not a tree: it refers to one object wherever it appears again,
so a few KB can hold a list reached along 2**40 paths, or a list that holds itself. What is kept of
it as plain data (``is_plain_data``) is walked once, counted per path, within a bound.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from .errors import AttnInjectError

ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first local header
MAX_UNPACKED = 2  # what a zip archive may unpack to, in multiples of the file's size
MAX_PLAIN_ITEMS = 100_000  # values of one piece of plain data read from a file (a YOLO's YAML: a few hundred)
_PLAIN = (str, int, float, bool, type(None))


def open_regular(path: str | os.PathLike, what: str) -> BinaryIO:
    """``path`` opened for binary reading; anything but a regular file (after links) is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise AttnInjectError(f"cannot read {what}: {exc.strerror}", where=str(path)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AttnInjectError(
                f"{what} is not a regular file (it is {_kind(mode)})",
                where=str(path),
                hint=f"Give the path of a {what} on disk.",
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def read_errors(path: str | os.PathLike, what: str) -> Iterator[None]:
    """An OSError while reading (a failing disk, a lost mount) as one AttnInjectError."""
    try:
        yield
    except OSError as exc:
        raise AttnInjectError(f"cannot read {what}: {exc.strerror or exc}", where=str(path)) from None


def read_bounded(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """All of a regular file of at most ``limit`` bytes; a larger one is refused before it is read."""
    with open_regular(path, what) as handle, read_errors(path, what):
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise AttnInjectError(f"{what} is {size:,} bytes; {what}s are at most {limit:,}", where=str(path))
        data = read_exactly_at_most(handle, limit + 1)
    if len(data) > limit:  # it grew while being read
        raise AttnInjectError(f"{what} is more than {limit:,} bytes; {what}s are at most {limit:,}", where=str(path))
    return data


def check_unpacks_within(path: str | os.PathLike, what: str) -> None:
    """Refuse a zip archive whose entries unpack to more than ``MAX_UNPACKED`` times the file's size
    (see above), or one whose directory cannot be read; a file that is not a zip is left to its reader."""
    with open_regular(path, what) as handle, read_errors(path, what):
        size = os.fstat(handle.fileno()).st_size
        zipped = handle.read(4) == ZIP_MAGIC  # what torch takes for an archive
        handle.seek(0)
        try:
            with zipfile.ZipFile(handle) as archive:
                entries = archive.infolist()
        except (zipfile.BadZipFile, ValueError, EOFError) as exc:
            if not zipped:
                return
            raise AttnInjectError(
                f"{what} is a zip archive whose directory cannot be read ({exc})",
                where=str(path),
                hint="The file is truncated or damaged; get it again.",
            ) from None
    unpacked = sum(entry.file_size for entry in entries)
    if unpacked > MAX_UNPACKED * size:
        largest = max(entries, key=lambda entry: entry.file_size)
        raise AttnInjectError(
            f"{what} unpacks to {unpacked:,} bytes from a file of {size:,} (compressed zip entries: "
            f"{largest.filename} is {largest.compress_size:,} bytes unpacking to {largest.file_size:,}); "
            f"attn_inject unpacks at most {MAX_UNPACKED} times a file's size",
            where=str(path),
            hint="torch.save writes archives that unpack to their own size: save the weights again with "
            "torch.save, or as .safetensors.",
        )


def is_plain_data(value: Any, max_items: int = MAX_PLAIN_ITEMS) -> bool:
    """JSON-like data read from a file (dicts with str or int keys, lists, tuples, str, int, float, bool,
    None; no object of any class) of at most ``max_items`` values counted once per path: a pickle can
    refer to one list along 2**40 paths, or let a list hold itself, too much for any comparison, copy
    or message that walks it."""
    stack, count = [value], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > max_items:
            return False
        if isinstance(item, dict):
            if not all(isinstance(k, (str, int)) for k in item):
                return False
            stack += item.values()
        elif isinstance(item, (list, tuple)):
            stack += item
        elif not isinstance(item, _PLAIN):
            return False
    return True


def read_exactly_at_most(handle: BinaryIO, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``handle`` (fewer only at the end of the file)."""
    chunks, left = [], limit
    while left > 0:
        chunk = handle.read(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a file")
