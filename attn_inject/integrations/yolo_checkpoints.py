"""ultralytics .pt checkpoints: read as data for ``attn-inject patch`` and ``load``, written for ultralytics.

An ultralytics .pt pickles the whole model object. attn_inject never unpickles it: it is read with
files/inert_pickle.py (torch's weights-only unpickler, every class a file names standing for an
inert record), which gives the model's tensors, its YAML, class names and train arguments, and for
a patched model the recipe (pickled as its JSON text). The model is then built from the bundled
YAML its ``yaml_file`` names (``ultralytics:<name>``, with the checkpoint's ``nc``), as the recipe
does; a YAML that is not bundled, or differs from the bundled file, is refused with the key.

Writing a .pt for ultralytics is an ordinary ``torch.save`` of the checkpoint dict ultralytics
reads (``{"model": model, "ema": None, "train_args": ..., ...}``), the model in the dtype the input
held (ultralytics saves fp16), so ``YOLO(path)`` opens it with its blocks, and ``keep_blocks``
makes it train with them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AttnInjectError
from ..files.format import header_of
from ..files.inert_pickle import Inert, globals_named, module_state, read_inert
from ..files.output import atomic_write, check_output
from ..files.patch import SAFETENSORS, PatchReport, PatchSettings, PatchWriter, PhaseClock, patch_state
from ..files.saving import rebuild
from ..safe_read import is_plain_data
from ..surgery.recipe import Recipe
from .yolo import EXAMPLE_SIDE, yaml_difference

_RECIPE_READER = "attn_inject.surgery.recipe.recipe_from_json"  # what a pickled recipe names
_KEPT_ENTRIES = ("license", "docs", "train_args", "train_metrics", "train_results", "git", "best_fitness")
_MODEL_ATTRIBUTES = ("names", "args", "task")  # copied onto the rebuilt model when they are plain data


@dataclass(frozen=True)
class YoloCheckpoint:
    """An ultralytics .pt as data."""

    path: Path
    content: dict[str, Any]  # the checkpoint dict, its objects as Inert records
    model: Inert  # its "ema" (a training checkpoint) or its "model"
    state: dict[str, torch.Tensor]
    config: dict[str, Any]  # the model's YAML
    recipe: Recipe | None  # what attn_inject injected into it, if anything

    @property
    def arch(self) -> tuple[str, int | None]:
        """``("ultralytics:<yaml file>", nc)``; a model from another YAML is refused."""
        problem = yaml_difference(self.config)
        if problem is not None:
            raise AttnInjectError(
                f"the checkpoint's model cannot be rebuilt by name: {problem}",
                where=str(self.path),
                hint="attn_inject rebuilds ultralytics models from the YAMLs bundled with ultralytics; patch a "
                "model built from one, or inject in Python and save with attn_inject.save(yolo, PATH).",
            )
        nc = self.config.get("nc")
        return f"ultralytics:{Path(str(self.config['yaml_file'])).name}", nc if isinstance(nc, int) else None

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype its weights are stored in (fp16 for ultralytics' own files)."""
        return next((t.dtype for t in self.state.values() if t.is_floating_point()), torch.float32)

    def attributes(self) -> dict[str, Any]:
        """The model's class names, train arguments and task, where they are plain data."""
        found = self.model.attributes()
        return {k: found[k] for k in _MODEL_ATTRIBUTES if k in found and is_plain_data(found[k])}


def is_yolo_checkpoint(path: str | os.PathLike) -> bool:
    """A .pt file whose pickle names ultralytics classes (read without unpickling)."""
    path = Path(path)
    if path.suffix != ".pt" or not path.is_file():
        return False
    try:
        return any(name.startswith("ultralytics.") for name in globals_named(path))
    except AttnInjectError:
        return False


def read_yolo_checkpoint(path: str | os.PathLike) -> YoloCheckpoint:
    path = Path(path)
    content = read_inert(path)
    model = (content.get("ema") or content.get("model")) if isinstance(content, dict) else None
    if not isinstance(model, Inert) or not model.name.startswith("ultralytics."):
        raise AttnInjectError(
            "not an ultralytics checkpoint (no pickled ultralytics model under 'model' or 'ema')",
            where=str(path),
            hint="Give a .pt written by ultralytics (YOLO.save(), a training run's weights/best.pt).",
        )
    attributes = model.attributes()
    config = attributes.get("yaml")
    if not isinstance(config, dict) or not is_plain_data(config):
        raise AttnInjectError("the checkpoint's model has no YAML as plain data", where=str(path))
    assert isinstance(content, dict)
    return YoloCheckpoint(
        path, content, model, module_state(model, path), config, _recipe(attributes.get("_attn_inject_recipe"), path)
    )


def _recipe(value: Any, path: Path) -> Recipe | None:
    if value is None:
        return None
    if isinstance(value, Inert) and value.name == _RECIPE_READER and len(value.args) == 1:
        return Recipe.from_json(value.args[0], str(path))
    raise AttnInjectError(
        "the checkpoint's attn_inject recipe is in a form this version does not read",
        where=str(path),
        hint="It was written by another attn_inject version; write it again with this one.",
    )


def load_yolo_checkpoint(path: Path, device: torch.device, dtype: torch.dtype | None) -> nn.Module | None:
    """A patched ultralytics .pt as a model (``load``): built from its bundled YAML, recipe replayed,
    every tensor loaded strictly. None for a file that is no ultralytics checkpoint."""
    if not is_yolo_checkpoint(path):
        return None
    found = read_yolo_checkpoint(path)
    if found.recipe is None or not found.recipe.injections:
        raise AttnInjectError(
            "the ultralytics checkpoint holds no attn_inject blocks",
            where=str(path),
            hint="Open it with ultralytics' YOLO(path); `attn-inject patch` injects into it.",
        )
    arch, nc = found.arch
    header = header_of(path, found.recipe, found.state)
    # ultralytics saves its weights in fp16 and builds in fp32: the file's dtypes are converted
    model = rebuild(found.recipe, arch, nc, header, device, convert=True, tensors=lambda: found.state)
    _dress(model, found)
    model.to(device)
    return model.to(dtype) if dtype is not None else model


def _dress(model: nn.Module, found: YoloCheckpoint) -> None:
    for name, value in found.attributes().items():
        setattr(model, name, copy.deepcopy(value))


def patch_yolo_checkpoint(
    source: str | os.PathLike, block: str, after: Any, output: str | os.PathLike, **settings: Any
) -> PatchReport:
    """``attn-inject patch`` of an ultralytics .pt: ``output`` is a .pt for ultralytics or a .safetensors.
    ``settings``: those of ``patch_checkpoint`` (include, exclude, position, img_size, options, force,
    adapter_only, verify) but ``num_classes``, which the checkpoint gives."""
    chosen = PatchSettings(**settings)
    clock = PhaseClock()
    out = check_output(output, inputs=[source], force=chosen.force)
    if out.suffix not in (".pt", ".safetensors"):
        raise AttnInjectError(
            "the output of an ultralytics checkpoint must be a .pt (for ultralytics) or a .safetensors file",
            where=str(out),
            hint="Name it NAME.pt or NAME.safetensors.",
        )
    if chosen.adapter_only and out.suffix == ".pt":
        raise AttnInjectError("an adapter is a .safetensors file", where=str(out), hint="Name it NAME.safetensors.")
    found = read_yolo_checkpoint(source)
    if found.recipe is not None and found.recipe.injections:
        raise AttnInjectError(
            "the checkpoint already holds attn_inject blocks",
            where=str(source),
            hint="Train it as it is (attn_inject.keep_blocks(YOLO(path)).train(...)), or patch the checkpoint "
            "it was made from.",
        )
    arch, nc = found.arch
    clock.lap("read")
    writer = SAFETENSORS if out.suffix == ".safetensors" else UltralyticsPt(found)
    given = chosen.img_size is not None or chosen.input_size is not None
    chosen = dataclasses.replace(chosen, num_classes=nc, img_size=chosen.img_size if given else EXAMPLE_SIDE)
    return patch_state(found.state, source, arch, block, after, out, writer, chosen, clock, lambda m: _dress(m, found))


class UltralyticsPt(PatchWriter):
    """Writes the patched model as an ultralytics checkpoint like the one it was read from."""

    def __init__(self, found: YoloCheckpoint):
        self.found = found

    def write(
        self, model: nn.Module, out: Path, force: bool, adapter_only: bool, check: Callable[[Path], None]
    ) -> None:
        import ultralytics

        content = self.found.content
        kept = {k: content[k] for k in _KEPT_ENTRIES if k in content and is_plain_data(content[k])}
        checkpoint = {
            **kept,
            "date": datetime.now().astimezone().isoformat(),
            "version": ultralytics.__version__,
            "epoch": -1,  # a finished model, not a run to resume
            "model": copy.deepcopy(model).to(self.found.dtype),
            "ema": None,
            "optimizer": None,
        }

        def write(tmp: Path) -> None:
            torch.save(checkpoint, tmp)
            check(tmp)

        atomic_write(out, write)

    def read_back(self, path: Path) -> tuple[str | None, dict[str, torch.Tensor]]:
        written = read_yolo_checkpoint(path)
        return None if written.recipe is None else written.recipe.to_json(), written.state

    def expected(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.found.dtype) if v.is_floating_point() else v for k, v in state.items()}

    def rebuild(self, path: Path, arch: str, num_classes: int | None) -> nn.Module:
        model = load_yolo_checkpoint(path, torch.device("cpu"), None)
        assert model is not None  # it was just written as one
        return model
