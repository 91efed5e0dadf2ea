"""ultralytics as the tests run it: offline, every file it writes inside a temporary folder, and tiny
YOLO-format data sets made from ``skimage.data`` photos.

ultralytics reads its environment when it is first imported, so ``offline_environment`` runs from
``pytest_configure`` (tests/conftest.py), before any test module imports it:

- ``YOLO_OFFLINE=1``: no online checks, no analytics events;
- ``YOLO_AUTOINSTALL=0``: never pip-installs a missing package (export's onnx checks);
- ``YOLO_CONFIG_DIR``: its settings file and fonts go to the temporary folder; a local TrueType font
  copied there as ``Arial.ttf`` / ``Arial.Unicode.ttf`` keeps ``check_font`` from downloading one.

Every call then passes ``project=`` (a test's tmp_path), ``plots=False``, ``amp=False`` and
``workers=0``: ultralytics writes runs under the git root, or under its own package when it sees
pytest, otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

OFFLINE = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}


def offline_environment() -> Path:
    """Set the variables above for this process; returns the temporary config folder."""
    import matplotlib

    root = Path(tempfile.mkdtemp(prefix="attn_inject_ultralytics_"))
    fonts = root / "Ultralytics"
    fonts.mkdir()
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        shutil.copy(font, fonts / name)
    os.environ.update({**OFFLINE, "YOLO_CONFIG_DIR": str(root)})
    return root


def quiet_settings() -> None:
    """No integrations (TensorBoard, W&B, ...) and no sync, in the temporary settings file."""
    from ultralytics.utils import SETTINGS

    off = ("clearml", "comet", "dvc", "hub", "mlflow", "neptune", "raytune", "tensorboard", "wandb")
    SETTINGS.update({"sync": False, **{k: False for k in off if k in SETTINGS}})


def run_args(project: Path, imgsz: int = 64) -> dict:
    """Arguments every train / val / predict call of the tests takes."""
    return dict(project=str(project), imgsz=imgsz, device="cpu", workers=0, plots=False, verbose=False, exist_ok=True)


def train_args(project: Path, data: Path, imgsz: int = 64) -> dict:
    return {**run_args(project, imgsz), "data": str(data), "epochs": 1, "batch": 4, "amp": False, "seed": 0}


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
    }


# (class, cx, cy, w, h) in relative coordinates: rough boxes around each photo's subject
_BOXES = {
    "astronaut": [(1, 0.45, 0.25, 0.25, 0.3), (0, 0.5, 0.6, 0.8, 0.8)],
    "chelsea": [(1, 0.45, 0.35, 0.4, 0.5)],
    "coffee": [(0, 0.5, 0.5, 0.7, 0.8)],
    "rocket": [(0, 0.5, 0.55, 0.2, 0.8)],
}


def detect_dataset(root: Path, size: int = 64, mirrored: bool = False) -> Path:
    """Four photos at ``size`` px with one or two boxes each, val the same four; returns data.yaml.
    ``mirrored``: the training split also holds each photo mirrored left to right (eight images)."""
    from PIL import Image

    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for name, photo in _photos().items():
            for flip in (False, True) if mirrored and split == "train" else (False,):
                image = np.ascontiguousarray(photo[:, ::-1] if flip else photo)
                stem = f"{name}_mirrored" if flip else name
                Image.fromarray(image).convert("RGB").resize((size, size)).save(root / "images" / split / f"{stem}.jpg")
                boxes = [(c, 1 - x if flip else x, y, w, h) for c, x, y, w, h in _BOXES[name]]
                rows = "".join(f"{c} {x} {y} {w} {h}\n" for c, x, y, w, h in boxes)
                (root / "labels" / split / f"{stem}.txt").write_text(rows)
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n  1: face\n")
    return data


@contextmanager
def block_calls(model) -> Iterator[dict[str, int]]:
    """Calls of every injected block by name while the context is open, counted in copies of the model
    too: ultralytics deep-copies the model before val, predict and export, and forward hooks go with it."""
    from attn_inject.finetune.params import attention_blocks

    calls = dict.fromkeys(attention_blocks(model), 0)
    handles = [
        block.register_forward_hook(lambda module, args, out, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, block in attention_blocks(model).items()
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def block_tensors(model) -> dict[str, torch.Tensor]:
    """The injected blocks' tensors, as fp32 copies (ultralytics checkpoints hold fp16)."""
    from attn_inject.surgery.recipe import injected_key, recipe_of

    modules = set(recipe_of(model).modules)
    return {k: v.detach().float().clone() for k, v in model.state_dict().items() if injected_key(k, modules)}
