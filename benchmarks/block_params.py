"""Parameter counts of the new blocks against their papers' tables and timm's hand-written models.

* Coordinate attention (Hou et al., CVPR 2021, Table 2 / the authors' README): MobileNetV2 1.0 3.5M,
  + CA 3.95M. The authors' ``mbv2_ca.py`` puts CA after the depthwise conv unit of every inverted
  residual that expands (t = 6; not the first block, t = 1), reduction 32, min 8 channels: here
  ``inject(torchvision mobilenet_v2, "coord", after="mbconv_se", exclude="features.1")``.
* GCT (Yang et al., CVPR 2020): three C-vectors (alpha, gamma, beta) per unit, by the paper's
  definition (its Eq. 1-4) and the authors' ``GCT.py``: 3 x 256 = 768 at 256 channels.
* timm's hand-written nets (``benchmarks.reconstruct`` checks the same counts with the weights):
  ``resnet50`` with ``attn_layer`` cbam / gc / gca / coord, and ``gcresnet33ts``.

    python -m benchmarks.block_params

Results go to ``benchmarks/results/block_params.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from attn_inject import inject
from attn_inject.blocks import get_block

from .reconstruct import CASES

DEFAULT_JSON = Path(__file__).parent / "results" / "block_params.json"
EXAMPLE = torch.randn(1, 3, 64, 64)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def coordinate_attention_mobilenet_v2() -> dict:
    """torchvision MobileNetV2 with CA where the authors put it: the paper's 3.5M -> 3.95M."""
    model = torchvision.models.mobilenet_v2()
    before = count(model)
    inject(model, "coord", after="mbconv_se", exclude="features.1", init="paper", example_input=EXAMPLE)
    return {
        "model": "torchvision:mobilenet_v2 + coord",
        "paper": "3.5M -> 3.95M",
        "before": before,
        "after": count(model),
    }


def timm_counts() -> list[dict]:
    """Each new-block reconstruction case: the patched attention-free twin against timm's own net."""
    rows = []
    for case in CASES:
        if case.block in ("se", "eca"):
            continue
        hand = case.hand()
        plain = case.plain(hand)
        patched = inject(plain, case.block, after=case.rule, init="paper", example_input=EXAMPLE, **dict(case.options))
        rows.append(
            {"model": case.name, "timm": count(hand), "patched": count(patched), "equal": count(hand) == count(patched)}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    args = parser.parse_args()
    result = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "coordinate_attention": coordinate_attention_mobilenet_v2(),
        "gct_at_256": count(get_block("gct")(256)),
        "timm_models": timm_counts(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    ca = result["coordinate_attention"]
    print(f"| {ca['model']} | paper {ca['paper']} | here {ca['before']:,} -> {ca['after']:,} |")
    print(f"| GCT at 256 channels | paper 3C = 768 | here {result['gct_at_256']:,} |")
    for row in result["timm_models"]:
        print(f"| {row['model']} | timm {row['timm']:,} | patched {row['patched']:,} | equal {row['equal']} |")


if __name__ == "__main__":
    main()
