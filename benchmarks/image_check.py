"""The full image check before fine-tuning (``attn_inject.finetune.image_check``): its cost per 1,000 images.

An ImageFolder of N JPEGs and N PNGs (random crops of ``skimage.data`` photos, SIDE x SIDE) is
checked the way ``attn-inject finetune`` checks it before the first step: every image decoded
(``check_images`` with the cache off) over 1 thread and over ``--workers`` threads; then with the cache
on, twice: the first run decodes and writes the cache, the second only compares path, size and
mtime. For scale: opening every header only (what the check did before it decoded), and one pass of
decoding plus timm's train transform (what one epoch of data loading costs).

    python -m benchmarks.image_check                 # 1,000 JPEG + 1,000 PNG at 224 px
    python -m benchmarks.image_check --quick         # 40 + 40 at 64 px (the test run)

Results: ``benchmarks/results/image_check.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform

from attn_inject.finetune.image_check import CACHE_ENV, check_images, open_rgb
from benchmarks.results_file import loadavg

RESULTS = Path(__file__).parent / "results"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "horse", "immunohistochemistry")


def write_images(root: Path, count: int, side: int, fmt: str) -> list[str]:
    """``count`` crops of skimage photos as root/<photo>/<n>.<fmt> (an ImageFolder split)."""
    import skimage.data

    rng = np.random.default_rng(0)
    photos = []
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos.append((name, image[..., :3].astype(np.uint8)))
    paths = []
    for i in range(count):
        name, image = photos[i % len(photos)]
        h, w = image.shape[:2]
        scale = side / min(h, w) * rng.uniform(1.0, 1.5)
        resized = Image.fromarray(image).resize((max(side, round(w * scale)), max(side, round(h * scale))))
        x, y = rng.integers(0, resized.width - side + 1), rng.integers(0, resized.height - side + 1)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}.{fmt}"
        resized.crop((x, y, x + side, y + side)).save(path, **({"quality": 90} if fmt == "jpg" else {}))
        paths.append(str(path))
    return paths


def seconds(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure(root: Path, paths: list[str], workers: int, reps: int, side: int) -> dict[str, Any]:
    per_k = 1000 / len(paths)
    row: dict[str, Any] = {"images": len(paths)}
    os.environ[CACHE_ENV] = "off"
    row["decode_1_thread_ms_per_1000"] = (
        1000 * per_k * statistics.median(seconds(lambda: check_images(root, paths, workers=0), reps))
    )
    row[f"decode_{workers}_threads_ms_per_1000"] = (
        1000 * per_k * statistics.median(seconds(lambda: check_images(root, paths, workers=workers), reps))
    )

    def headers() -> None:
        for path in paths:
            with Image.open(path) as image:
                image.size  # noqa: B018 - the header is parsed on open

    row["headers_only_ms_per_1000"] = 1000 * per_k * statistics.median(seconds(headers, reps))
    train = create_transform(side, is_training=True)

    def one_epoch_of_loading() -> None:
        for path in paths:
            train(open_rgb(path))

    one_epoch = seconds(one_epoch_of_loading, 1)
    row["decode_and_train_transform_ms_per_1000"] = 1000 * per_k * one_epoch[0]
    with tempfile.TemporaryDirectory() as cache:
        os.environ[CACHE_ENV] = cache
        first = seconds(lambda: check_images(root, paths, workers=workers), 1)[0]
        cached = statistics.median(seconds(lambda: check_images(root, paths, workers=workers), reps))
        assert check_images(root, paths)["cached"] == len(paths)
    row["cache_first_run_ms_per_1000"] = 1000 * per_k * first
    row["cache_second_run_ms_per_1000"] = 1000 * per_k * cached
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 images of each format at 64 px, 1 repetition")
    parser.add_argument("--images", type=int, help="images per format (default 1000; --quick: 40)")
    parser.add_argument("--side", type=int, help="image side in pixels (default 224; --quick: 64)")
    parser.add_argument("--workers", type=int, default=2, help="threads of the parallel check (default 2)")
    parser.add_argument("--reps", type=int, help="repetitions, median reported (default 3; --quick: 1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, default=RESULTS / "image_check.json", help="raw results")
    args = parser.parse_args()
    count = args.images or (40 if args.quick else 1000)
    side = args.side or (64 if args.quick else 224)
    reps = args.reps or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    before = loadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("jpg", "png"):
            root = Path(tmp) / fmt
            paths = write_images(root, count, side, fmt)
            size = sum(os.path.getsize(p) for p in paths)
            row = measure(root, paths, args.workers, reps, side)
            rows.append({"format": fmt, "side": side, "bytes_per_image": size / count, **row})
    result = {
        "rows": rows,
        "config": {
            "quick": args.quick,
            "workers": args.workers,
            "reps": reps,
            "cpu_count": os.cpu_count(),
            "timm": timm.__version__,
            "loadavg_before": before,
            "loadavg_after": loadavg(),
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\nms per 1,000 images ({count} per format, median of {reps}; load average {before} -> {loadavg()}):\n")
    w = args.workers
    print(
        f"| format | side | kB/image | full decode, 1 thread | full decode, {w} threads | cached (2nd run) | "
        "headers only | decode + train transform |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [
            r["format"],
            str(r["side"]),
            f"{r['bytes_per_image'] / 1000:.1f}",
            f"{r['decode_1_thread_ms_per_1000']:.0f}",
            f"{r[f'decode_{w}_threads_ms_per_1000']:.0f}",
            f"{r['cache_second_run_ms_per_1000']:.1f}",
            f"{r['headers_only_ms_per_1000']:.0f}",
            f"{r['decode_and_train_transform_ms_per_1000']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print(f"\nraw results: {args.json}")


if __name__ == "__main__":
    main()
