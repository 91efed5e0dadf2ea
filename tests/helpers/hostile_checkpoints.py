"""Small torch checkpoints that ask for unbounded work: archives re-packed with deflated entries
(torch.save stores its entries as they are, and torch.load unpacks whatever a zip holds, so a file
of kilobytes can ask for gigabytes), and pickled modules that share one child along many paths (a
pickle stores an object once and refers to it, so a few KB describe a tree of 2**depth modules)."""

from __future__ import annotations

import sys
import types
import zipfile
from pathlib import Path

import torch
from torch import nn


def deflated(source: Path, target: Path) -> Path:
    """``source`` (a torch.save archive) written to ``target`` with every entry deflated."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for entry in archive.infolist():
            out.writestr(entry.filename, archive.read(entry), compress_type=zipfile.ZIP_DEFLATED)
    return target


def shared_list(depth: int) -> list:
    """A list holding the list below twice, ``depth`` levels down: 2**depth paths to the bottom one."""
    level: list = [1]
    for _ in range(depth):
        level = [level, level]
    return level


def shared_module_tree(
    path: Path, depth: int, ultralytics: bool = False, yaml: object = None, itself: bool = False, empty: bool = False
) -> Path:
    """A checkpoint ``{"model": m}`` where each of ``depth`` levels holds the level below twice (one
    Linear at the bottom, or with ``empty`` an Identity): 2**depth paths to it; ``itself``: the bottom
    level holds itself too.
    ``ultralytics``: ``m``'s class is named ``ultralytics.nn.tasks.DetectionModel`` (a stand-in put in
    ``sys.modules`` while saving; the real package is not imported), so ``patch`` takes the file for an
    ultralytics .pt. ``yaml``: ``m.yaml`` (default: a bundled model's)."""
    names = ("ultralytics", "ultralytics.nn", "ultralytics.nn.tasks")
    saved = {name: sys.modules.get(name) for name in names}

    class DetectionModel(nn.Module):
        pass

    DetectionModel.__module__, DetectionModel.__qualname__ = names[-1], "DetectionModel"
    tasks = types.ModuleType(names[-1])
    tasks.DetectionModel = DetectionModel  # type: ignore[attr-defined]
    level: nn.Module = nn.Identity() if empty else nn.Linear(2, 2)
    if itself:
        level.again = level
    for _ in range(depth):
        parent = nn.Module()
        parent.a, parent.b = level, level
        level = parent
    model = DetectionModel() if ultralytics else nn.Module()
    model.body = level
    model.yaml = {"nc": 80, "yaml_file": "yolov8n.yaml"} if yaml is None else yaml
    try:
        if ultralytics:
            sys.modules.update({names[0]: types.ModuleType(names[0]), names[1]: types.ModuleType(names[1])})
            sys.modules[names[-1]] = tasks
        torch.save({"model": model}, path)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return path
