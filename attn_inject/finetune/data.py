"""The data: an ImageFolder ``DIR/train/<class>/*``, ``DIR/val/<class>/*`` through timm's pipeline.

timm's ``create_dataset`` reads the folders, ``resolve_data_config(model=...)`` gives the model's
preprocessing (``img_size`` overrides its input size) and ``create_transform`` the train
augmentation and the eval transform. Everything a user can get wrong is checked before training:
missing or empty folders (an empty class folder too), train and val with different classes, a class
count that differs from the model's head, and every image, decoded (``image_check``).

Each sample's augmentation is drawn from its own seed (``seed``, epoch, index), so it does not
depend on the number of processes or loader workers: one process with batch 32 and two with
batch 16 see the same images, augmented the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from torch import nn
from torch.utils.data import Dataset

from ..errors import AttnInjectError, first_line
from ..graph.example import MAX_SIDE
from . import distributed
from .image_check import check_images, open_rgb

SPLITS = ("train", "val")


@dataclass(frozen=True)
class ImageFolderInfo:
    root: Path
    classes: tuple[str, ...]
    counts: dict[str, int]  # split -> images


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """timm's data config for ``model`` (mean, std, crop, interpolation), at ``img_size`` if given."""
    check_img_size(img_size)
    args = {"input_size": (3, img_size, img_size)} if img_size else {}
    return resolve_data_config(args, model=model)


def check_img_size(img_size: int | None) -> None:
    """None (the model's own size) or a side up to ``MAX_SIDE``, as ``plan`` takes."""
    if img_size is not None and not (type(img_size) is int and 1 <= img_size <= MAX_SIDE):
        raise AttnInjectError(f"img_size must be an integer in [1, {MAX_SIDE}], got {img_size}", field="img_size")


def image_folder(root: str | Path, split: str, transform: Any = None):
    """timm's folder dataset for ``root/split``, checked: it exists and holds images in class folders."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise AttnInjectError(
            f"no {split}/ folder",
            where=str(Path(root)),
            hint=f"Use the ImageFolder layout: {Path(root) / split}/<class>/<image>.",
        )
    try:
        dataset = create_dataset("", root=str(folder), split=split, search_split=False, transform=transform)
    except RuntimeError as exc:  # timm: "Found 0 images in subfolders of ..."
        if "Found 0 images" not in str(exc):
            raise
        dataset = None
    if dataset is None or len(dataset) == 0:
        raise AttnInjectError(
            "no images found",
            where=str(folder),
            hint=f"Put the images in one folder per class ({', '.join(get_img_extensions())}).",
        )
    return dataset


def image_paths(dataset) -> list[str]:
    """The absolute path of every image of a folder dataset (or ``SeededSamples``), in index order."""
    reader = dataset.reader
    return [reader.filename(i, absolute=True) for i in range(len(reader))]


def classes_of(dataset) -> tuple[str, ...]:
    mapping = dataset.reader.class_to_idx
    return tuple(sorted(mapping, key=mapping.__getitem__))


def check_image_folder(
    root: str | Path,
    splits: tuple[str, ...] = SPLITS,
    *,
    workers: int = 0,
    context: distributed.Context | None = None,
    progress: Any = None,
) -> ImageFolderInfo:
    """Check ``root``'s splits exist, hold images in class folders (none empty) and agree on the
    classes; then decode every image (``image_check.check_images``: ``workers`` threads, cached)."""
    root = Path(root)
    if not root.is_dir():
        raise AttnInjectError(
            "no such data folder", where=str(root), hint="Pass the folder that holds train/ and val/."
        )
    datasets = {split: image_folder(root, split) for split in splits}
    for split in splits:
        _refuse_empty_class_folders(root / split)
    classes = {split: classes_of(ds) for split, ds in datasets.items()}
    first = splits[0]
    for split in splits[1:]:
        if classes[split] != classes[first]:
            only_first = sorted(set(classes[first]) - set(classes[split]))[:5]
            only_here = sorted(set(classes[split]) - set(classes[first]))[:5]
            raise AttnInjectError(
                f"{first}/ has {len(classes[first])} classes and {split}/ has {len(classes[split])}; they differ "
                f"(only in {first}/: {only_first or 'none'}, only in {split}/: {only_here or 'none'})",
                where=str(root),
                hint="Both splits need the same class folders.",
            )
    paths = [path for ds in datasets.values() for path in image_paths(ds)]
    check_images(root, paths, workers=workers, context=context, progress=progress)
    return ImageFolderInfo(root, classes[first], {split: len(ds) for split, ds in datasets.items()})


def _refuse_empty_class_folders(folder: Path) -> None:
    extensions = set(get_img_extensions(as_set=True))
    for child in sorted(folder.iterdir()):
        hidden = child.name.startswith(".")
        if child.is_dir() and not hidden and not any(f.suffix.lower() in extensions for f in child.rglob("*")):
            raise AttnInjectError(
                f"the class folder {child.name}/ holds no images",
                where=str(child),
                hint="Put images in it or remove it (each class folder is a class of the model's head).",
            )


def head_size(model: nn.Module) -> int | None:
    """Outputs of the classifier: timm's ``num_classes``, else the last Linear's ``out_features``."""
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        return num_classes
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def fit_head(model: nn.Module, n_classes: int, num_classes: int | None) -> bool:
    """Check the head against the data; replace it (timm ``reset_classifier``) only when asked.

    Returns True when the head was replaced (a new, randomly initialised classifier).
    """
    current = head_size(model)
    if num_classes is None:
        if current is not None and current != n_classes:
            raise AttnInjectError(
                f"the data has {n_classes} classes but the model's head has {current} outputs",
                hint=f"Pass num_classes={n_classes} to replace the head with a new one (it starts untrained).",
                field="num_classes",
            )
        return False
    if num_classes != n_classes:
        raise AttnInjectError(
            f"num_classes={num_classes} does not match the data's {n_classes} classes", field="num_classes"
        )
    if current == num_classes:
        return False
    reset_classifier = getattr(model, "reset_classifier", None)
    if not callable(reset_classifier):
        raise AttnInjectError(
            f"{type(model).__name__} has no reset_classifier() to replace its head",
            hint="Replace the classifier in Python and save the model first.",
        )
    reset_classifier(num_classes)
    return True


def transforms(config: dict[str, Any], **train_options: Any) -> tuple[Any, Any]:
    """timm's (train, eval) transforms for a data config; ``train_options`` go to create_transform for
    training (``interpolation`` there is the train interpolation, as timm's ``--train-interpolation``)."""
    try:
        train = create_transform(**{**config, **train_options}, is_training=True)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise AttnInjectError(
            f"timm's create_transform refuses the train augmentation {train_options}: {type(exc).__name__}: "
            f"{first_line(exc)}",
            hint="See timm.data.create_transform for the options and their values.",
            field="train_transform",
        ) from None
    evaluation = create_transform(**config)
    return train, evaluation


class SeededSamples(Dataset):
    """``dataset[i]`` transformed under a seed of its own: (seed, epoch, i).

    Images are decoded as RGB here (a file that fails to decode raises AttnInjectError naming it).
    Python's, NumPy's and torch's random generators are seeded for the transform and restored after.
    """

    def __init__(self, dataset, transform: Any, seed: int = 0):
        self.reader = dataset.reader
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.reader.filename(index, absolute=True)
        target = self.reader.samples[index][1]
        image = open_rgb(path)
        sample_seed = hash((self.seed, self.epoch, index)) % 2**31
        with seeded(sample_seed):
            return self.transform(image), target


class seeded:
    """Seed Python's, NumPy's and torch's CPU generators; restore their states on exit."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.default_generator.manual_seed(self.seed)  # the CPU generator only: CUDA's is left alone

    def __exit__(self, *exc: Any) -> None:
        python, numpy_state, torch_state = self.states
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
