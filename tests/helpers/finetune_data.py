"""A tiny classifier and tiny synthetic ImageFolders for the fine-tuning tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from attn_inject import inject
from attn_inject.testing import look_trained

SIZE = 16


def norm(kind: str, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if kind == "bn" else nn.GroupNorm(4, c)


class Basic(nn.Module):
    def __init__(self, c: int, kind: str):
        super().__init__()
        self.conv1, self.n1 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(kind, c)
        self.conv2, self.n2 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(kind, c)

    def forward(self, x):
        y = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(x + self.n2(self.conv2(y)))


class TinyNet(nn.Module):
    """Stem, two basic residual blocks, GAP, linear head; timm's num_classes / reset_classifier / pretrained_cfg."""

    def __init__(self, num_classes: int = 3, kind: str = "bn", width: int = 8):
        super().__init__()
        self.pretrained_cfg = {
            "input_size": (3, SIZE, SIZE),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
        }
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), norm(kind, width), nn.ReLU())
        self.blocks = nn.Sequential(Basic(width, kind), Basic(width, kind))
        self.num_classes = num_classes
        self.head = nn.Linear(width, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.head.in_features, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def tiny_gn(num_classes: int = 3) -> TinyNet:
    """GroupNorm: no per-rank batch statistics, so data-parallel runs can match one process."""
    return TinyNet(num_classes, kind="gn")


def tiny_bn(num_classes: int = 3) -> TinyNet:
    """BatchNorm: per-process batch statistics unless --sync-bn."""
    return TinyNet(num_classes, kind="bn")


def tiny_model(kind: str = "gn") -> nn.Module:
    """The tiny net with weights that look trained, ECA injected after both blocks."""
    torch.manual_seed(0)
    return inject(look_trained(TinyNet(kind=kind)), "eca", after="basic", example_input=torch.randn(1, 3, SIZE, SIZE))


def write_plain_checkpoint(root: Path, arch: str, num_classes: int = 3) -> nn.Module:
    """A timm model with weights that look trained (seed 0), saved as ``root/plain.pth``; returned."""
    torch.manual_seed(0)
    model = look_trained(timm.create_model(arch, num_classes=num_classes))
    torch.save(model.state_dict(), root / "plain.pth")
    return model


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("ant", "bee", "cat"),
    train: int = 8,
    val: int = 4,
    val_classes: tuple[str, ...] | None = None,
    size: int = SIZE,
    seed: int = 0,
) -> Path:
    """root/{train,val}/<class>/<n>.png: each class a colour of its own plus noise (learnable)."""
    rng = np.random.default_rng(seed)
    for split, count, names in (("train", train, classes), ("val", val, val_classes or classes)):
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 151 + 40) % 256], dtype=np.float64)
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def truncated_jpeg(path: Path, size: int = 64) -> Path:
    """A JPEG whose header is whole and whose pixels stop half-way: opens, fails to decode."""
    pixels = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bomb_png(path: Path, side: int = 10_000) -> Path:
    """A PNG claiming ``side`` x ``side`` pixels in a few hundred bytes (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * side) * 4)  # the first rows only
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def grey16_png(path: Path, values: np.ndarray) -> Path:
    """A 16-bit greyscale PNG holding ``values`` (uint16)."""
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path
