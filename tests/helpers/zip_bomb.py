"""Torch checkpoints re-packed with deflated zip entries: torch.save stores its entries as they are,
and torch.load unpacks whatever a zip holds, so a file of kilobytes can ask for gigabytes."""

from __future__ import annotations

import zipfile
from pathlib import Path


def deflated(source: Path, target: Path) -> Path:
    """``source`` (a torch.save archive) written to ``target`` with every entry deflated."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for entry in archive.infolist():
            out.writestr(entry.filename, archive.read(entry), compress_type=zipfile.ZIP_DEFLATED)
    return target
