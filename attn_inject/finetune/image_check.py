"""Reading images, and the full check before the first step: every image decoded once, in parallel.

``open_rgb`` reads an image as 8-bit RGB: at most ``Image.MAX_IMAGE_PIXELS`` pixels (PIL's bomb
limit, 89.5 M, checked from the header before any decoding), 16-bit grey scaled to 8 bits instead of
saturated, a truncated or damaged file refused. ``check_images`` decodes each image of the data over
``workers`` threads (PIL decodes outside the GIL), with a progress bar, and refuses the data with
one error naming the first bad file and how many there are. Under torchrun each process decodes its
share; the first bad file is agreed over all of them.

Images that decoded are remembered in a cache, keyed by their path, size and modification time, so
the next run over the same folder only decodes what changed. The cache is one JSON file per data
folder in ``$ATTN_INJECT_CACHE_DIR``, else ``$XDG_CACHE_HOME/attn_inject``, else
``~/.cache/attn_inject`` (folder made private to the user, file written atomically). It holds only
names, sizes and times, is read as data (a damaged or foreign cache counts as empty) and may be
deleted at any time; ``ATTN_INJECT_CACHE_DIR=off`` turns it off. A cache that wrongly says a file is
fine only moves the error to the loader, which names the file the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import AttnInjectError, first_line
from ..files.output import atomic_write
from . import distributed

CACHE_ENV = "ATTN_INJECT_CACHE_DIR"
CACHE_VERSION = 1


def check_images(
    root: str | Path,
    paths: Sequence[str],
    *,
    workers: int = 0,
    context: distributed.Context | None = None,
    progress: Any = None,
) -> dict[str, int]:
    """Decode every image in ``paths`` (those not cached as good); raise on the first that fails.

    Returns counts: ``images``, ``decoded`` (here, this process) and ``cached``.
    """
    context = context or distributed.Context()
    cache_file = cache_path(root)
    known = _read_cache(cache_file)
    stats = {path: _stat(path) for path in paths}
    todo = [i for i, path in enumerate(paths) if stats[path] is None or known.get(path) != stats[path]]
    mine = todo[context.rank :: context.world_size]
    bad = _decode_all([paths[i] for i in mine], workers, progress)
    first = min((mine[j] for j in bad), default=len(paths))
    count = len(bad)
    if context.distributed:
        first = int(distributed.all_min([float(first)], context)[0])
        count = int(distributed.all_sum([float(count)], context)[0])
    if context.is_main and cache_file is not None and todo:
        failed = {paths[i] for i in todo} - {paths[i] for j, i in enumerate(mine) if j not in set(bad)}
        good = stats if first == len(paths) else {p: s for p, s in stats.items() if p not in failed}
        _write_cache(cache_file, {p: s for p, s in good.items() if s is not None})
    if first < len(paths):
        try:
            with _quiet_bomb_warnings():
                open_rgb(paths[first])  # every process tells the same reason
        except AttnInjectError as exc:
            others = f" ({count - 1} more of the {len(paths)} images fail too)" if count > 1 else ""
            raise AttnInjectError(f"{exc.what}{others}", where=exc.where, hint=exc.hint) from None
    return {"images": len(paths), "decoded": len(mine), "cached": len(paths) - len(todo)}


def open_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` decoded as 8-bit RGB; an image over PIL's pixel limit, or one that fails to
    decode (truncated, damaged), is an AttnInjectError naming the file."""
    try:
        opened = Image.open(path)
    except Exception as exc:
        raise _bad_image(path, f"not a readable image ({type(exc).__name__})") from None
    with opened:
        width, height = opened.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and width * height > limit:
            raise _bad_image(
                path,
                f"the image is {width}x{height}, {width * height:,} pixels: more than {limit:,} (PIL's bomb limit)",
            )
        try:
            opened.load()
            return to_rgb(opened)
        except Exception as exc:
            raise _bad_image(path, f"cannot decode image ({type(exc).__name__}: {first_line(exc)})") from None


def _bad_image(path: str | Path, what: str) -> AttnInjectError:
    return AttnInjectError(what, where=str(path), hint="Remove or replace the file.")


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grey images (PNG ``I;16``, read by PIL as ``I;16`` or ``I``) are scaled by
    255/65535, where PIL's own conversion would clip every value above 255 to white."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.rint(values * (255 / 65535)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    return image.convert("RGB")


def cache_path(root: str | Path) -> Path | None:
    """The cache file for a data folder (None when the cache is off)."""
    setting = os.environ.get(CACHE_ENV)
    if setting == "off":
        return None
    if setting:
        folder = Path(setting)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = Path(base) / "attn_inject"
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:20]
    return folder / "image-check" / f"{key}.json"


def _decode_all(paths: list[str], workers: int, progress: Any) -> list[int]:
    """Indices (into ``paths``) of the images that fail to decode."""
    if progress is not None:
        progress.start("check images", len(paths))
    bad = []
    try:
        with _quiet_bomb_warnings(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, ok in enumerate(pool.map(_decodes, paths)):
                if not ok:
                    bad.append(i)
                if progress is not None:
                    progress.update(1)
    finally:
        if progress is not None:
            progress.stop()
    return bad


@contextmanager
def _quiet_bomb_warnings() -> Iterator[None]:
    """PIL warns of an image over its pixel limit; open_rgb refuses it, so the warning would only repeat that."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _decodes(path: str) -> bool:
    try:
        open_rgb(path)
    except AttnInjectError:
        return False
    return True


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_cache(path: Path | None) -> dict[str, list[int]]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not (
        isinstance(data, dict)
        and data.get("version") == CACHE_VERSION
        and data.get("max_pixels") == Image.MAX_IMAGE_PIXELS
        and isinstance(data.get("files"), dict)
    ):
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(v, list) and len(v) == 2}


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _write_cache(path: Path, files: dict[str, list[int]]) -> None:
    """Best effort: a cache that cannot be written only means the next run decodes again."""
    payload = {"version": CACHE_VERSION, "max_pixels": Image.MAX_IMAGE_PIXELS, "files": files}
    text = json.dumps(payload, sort_keys=True)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _write_text(tmp, text))
    except (OSError, AttnInjectError):
        return
