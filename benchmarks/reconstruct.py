"""Proof by reconstruction: injection rebuilds hand-written attention nets from their attention-free twins.

Each case: the hand-written model (untrained, made to look trained by
``attn_inject.testing.look_trained``: norms, running stats and zero-initialised parameters random),
its attention-free counterpart holding the same weights (timm's twin architecture, or a copy with
the attention modules replaced by nn.Identity), and the rule that puts the blocks back.

* ``init="paper"``: the hand-written model's weights are loaded into the patched model (shared keys
  by name; the new blocks' tensors by an explicit mapping: the hand-written model's attention tensors
  and the patched model's new tensors, each in state_dict order, paired one to one with equal
  shapes) and the outputs compared with ``torch.allclose`` (fp32, eval).
* ``init="identity"`` (the default): the patched model must equal the attention-free one bit for bit.

A 3-D case: MONAI's ``SEResNet50(spatial_dims=3)``, its 16 ``ChannelSELayer`` (linears on the
pooled vector) mapped onto the injected SE's 1x1x1 convs (the same weights, reshaped). Its twin is
the same net with the SE layers replaced by nn.Identity: MONAI's attention-free ``resnet50`` is
another function (stride on the 3x3x3 conv instead of the first 1x1x1, another stem and head), so
no weights make ``resnet50`` + SE compute ``SEResNet50``; it gets the same SE parameters
(benchmarks/nd_zoo.py counts them).

    python -m benchmarks.reconstruct            # all cases, 2x3x224x224
    python -m benchmarks.reconstruct --quick    # regnety_002 only, 64x64
    python -m benchmarks.reconstruct --only monai:SEResNet50-3d  # one case

Results go to ``benchmarks/results/reconstruct.json`` unless ``--json`` says otherwise. The tests
(tests/test_placements.py) import the cases from here.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from monai.networks.nets import SEResNet50
from torch import nn

from attn_inject import inject
from attn_inject.blocks import is_attention_block
from attn_inject.testing import look_trained

DEFAULT_JSON = Path(__file__).parent / "results" / "reconstruct.json"


def _strip(attr: str, path_of_block: Callable[[str, nn.Module], bool] = lambda p, m: True):
    """An attention-free copy: every ``attr`` child (the SE module) replaced by nn.Identity."""

    def strip(hand: nn.Module) -> nn.Module:
        plain = copy.deepcopy(hand)
        for path, module in list(plain.named_modules()):
            child = getattr(module, attr, None) if isinstance(module, nn.Module) else None
            if isinstance(child, nn.Module) and not isinstance(child, nn.Identity) and path_of_block(path, module):
                setattr(module, attr, nn.Identity())
        return plain

    return strip


def _timm_twin(name: str):
    """The attention-free timm model of the same design, holding the hand-written one's weights."""

    def twin(hand: nn.Module) -> nn.Module:
        plain = timm.create_model(name).eval()
        state = hand.state_dict()
        plain.load_state_dict({k: state[k] for k in plain.state_dict()})
        return plain

    return twin


def _torchvision_efficientnet_b0_strip(hand: nn.Module) -> nn.Module:
    plain = copy.deepcopy(hand)
    for module in plain.modules():
        if isinstance(module, torchvision.models.efficientnet.MBConv):
            block = module.block
            for i, child in enumerate(block):
                if isinstance(child, torchvision.ops.SqueezeExcitation):
                    block[i] = nn.Identity()
    return plain


@dataclass(frozen=True)
class Case:
    name: str  # the hand-written model
    hand: Callable[[], nn.Module]
    plain: Callable[[nn.Module], nn.Module]
    block: str
    rule: str
    sites: int
    include: Callable[[nn.Module], tuple[str, ...]] = lambda hand: ()  # blocks to patch, from the hand-written net
    options: tuple[tuple[str, Any], ...] = ()  # block options of the published layout
    example: tuple[int, ...] | None = None  # the example input's shape (default EXAMPLE, 1x3x64x64)
    sample: Callable[[int], tuple[int, ...]] = lambda size: (2, 3, size, size)  # the compared input at a size

    def example_input(self) -> torch.Tensor:
        return (
            EXAMPLE if self.example is None else torch.randn(self.example, generator=torch.Generator().manual_seed(0))
        )


def _mobilenetv3_se_blocks(hand: nn.Module) -> tuple[str, ...]:
    return tuple(
        p
        for p, m in hand.named_modules()
        if isinstance(getattr(m, "se", None), nn.Module) and not isinstance(m.se, nn.Identity)
    )


CASES = [
    Case(
        "timm:regnety_002", lambda: timm.create_model("regnety_002"), _timm_twin("regnetx_002"), "se", "regnet_se", 13
    ),
    Case("timm:efficientnet_b0", lambda: timm.create_model("efficientnet_b0"), _strip("se"), "se", "mbconv_se", 16),
    Case(
        "timm:mobilenetv3_large_100",
        lambda: timm.create_model("mobilenetv3_large_100"),
        _strip("se"),
        "se",
        "mobilenetv3_se",
        8,
        _mobilenetv3_se_blocks,
    ),
    Case("timm:seresnet18", lambda: timm.create_model("seresnet18"), _timm_twin("resnet18"), "se", "basic", 8),
    Case(
        "timm:ecaresnet26t", lambda: timm.create_model("ecaresnet26t"), _timm_twin("resnet26t"), "eca", "bottleneck", 8
    ),
    *(
        Case(
            f"timm:resnet50+{timm_name}",
            lambda timm_name=timm_name: timm.create_model("resnet50", block_args=dict(attn_layer=timm_name)),
            _timm_twin("resnet50"),
            block,
            "bottleneck",
            16,
            options=options,
        )
        for timm_name, block, options in (
            ("cbam", "cbam", ()),
            ("gc", "gc", ()),
            ("gca", "gc", (("fuse_add", True), ("fuse_scale", False))),
            ("coord", "coord", (("rd_ratio", 1 / 16 * 2 / 3), ("bias", False))),
        )
    ),
    Case(
        "timm:gcresnet33ts",
        lambda: timm.create_model("gcresnet33ts"),
        _timm_twin("resnet33ts"),
        "gc",
        "mmcv_after_conv2",
        10,
        options=(("fuse_add", True), ("fuse_scale", False)),
    ),
    Case(
        "torchvision:efficientnet_b0",
        lambda: torchvision.models.efficientnet_b0(),
        _torchvision_efficientnet_b0_strip,
        "se",
        "mbconv_se",
        16,
    ),
]
# 1-D / 3-D nets (MONAI's SE reduces to floor(C / 16): rd_divisor=1 gives the same widths at its channels)
ND_CASES = [
    Case(
        "monai:SEResNet50-3d",
        lambda: SEResNet50(spatial_dims=3, in_channels=1, num_classes=2),
        _strip("se_layer"),
        "se",
        "bottleneck",
        16,
        options=(("rd_divisor", 1),),
        example=(1, 1, 16, 16, 16),
        sample=lambda size: (2, 1, size // 4, size // 4, size // 4),
    ),
]


def attention_keys(hand: nn.Module, plain: nn.Module) -> list[str]:
    """The hand-written model's attention tensors (its keys the attention-free model lacks), in order."""
    plain_keys = set(plain.state_dict())
    return [k for k in hand.state_dict() if k not in plain_keys]


def load_by_order(patched: nn.Module, plain: nn.Module, hand: nn.Module) -> list[tuple[str, str]]:
    """Load the hand-written model's weights into the patched one: shared keys by name, the new
    blocks' tensors by order and shape. Returns the (hand key, patched key) pairs."""
    hand_state, plain_keys = hand.state_dict(), set(plain.state_dict())
    new_keys = [k for k in patched.state_dict() if k not in plain_keys]
    old_keys = attention_keys(hand, plain)
    assert len(new_keys) == len(old_keys), (len(new_keys), len(old_keys))
    pairs = list(zip(old_keys, new_keys))
    patched_state = patched.state_dict()
    mismatched = [(a, b) for a, b in pairs if _squeezed(hand_state[a].shape) != _squeezed(patched_state[b].shape)]
    assert not mismatched, mismatched[:3]
    # a linear's weight [out, in] is a 1x1(x1) conv's [out, in, 1, 1(, 1)]: the same numbers
    state = {k: hand_state[k] for k in plain_keys} | {
        b: hand_state[a].reshape(patched_state[b].shape) for a, b in pairs
    }
    patched.load_state_dict(state, strict=True)
    return pairs


def _squeezed(shape: torch.Size) -> tuple[int, ...]:
    """A shape without its trailing size-1 dims."""
    dims = list(shape)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


EXAMPLE = torch.randn(1, 3, 64, 64)  # the example forward for injection (small: analysis time grows with it)


def rebuild(case: Case, init: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(hand-written, attention-free, patched) for a case; the patched model has ``init`` blocks."""
    torch.manual_seed(0)
    hand = look_trained(case.hand())
    plain = case.plain(hand).eval()
    patched = inject(
        copy.deepcopy(plain),
        case.block,
        after=case.rule,
        include=case.include(hand),
        init=init,
        example_input=case.example_input(),
        **dict(case.options),
    )
    return hand, plain, patched.eval()


def measure(case: Case, size: int) -> dict:
    """Rebuild one case both ways; the numbers of the BENCHMARKS.md table."""
    start = time.perf_counter()
    hand, plain, patched = rebuild(case, "paper")
    pairs = load_by_order(patched, plain, hand)
    x = torch.randn(case.sample(size), generator=torch.Generator().manual_seed(1))
    identity = inject(
        copy.deepcopy(plain),
        case.block,
        after=case.rule,
        include=case.include(hand),
        example_input=case.example_input(),
        **dict(case.options),
    )
    with torch.no_grad():
        expected, got, without, same = hand(x), patched(x), plain(x), identity(x)
    return {
        "model": case.name,
        "block": case.block,
        "rule": case.rule,
        "input": list(x.shape),
        "sites": sum(1 for m in patched.modules() if is_attention_block(m)),
        "tensors_mapped": len(pairs),
        "params": sum(p.numel() for p in patched.parameters()),
        "params_equal": sum(p.numel() for p in patched.parameters()) == sum(p.numel() for p in hand.parameters()),
        "paper_allclose": bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5)),
        "paper_max_abs_diff": float((got - expected).abs().max()),
        "attention_matters_max_abs_diff": float((without - expected).abs().max()),
        "identity_bitwise": bool(torch.equal(same, without)),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="regnety_002 only, 64x64 inputs")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="cases whose name contains one of these (e.g. resnet50+)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = CASES[:1] if args.quick else CASES + ND_CASES
    if args.only:
        cases = [c for c in CASES + ND_CASES if any(part in c.name for part in args.only)]
    rows = [measure(case, 64 if args.quick else 224) for case in cases]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torch": torch.__version__, "timm": timm.__version__, "rows": rows}, indent=1))
    print(
        "| model | block, rule | sites | parameters equal | paper init: allclose (max abs diff) "
        "| without attention (max abs diff) | identity init: bitwise |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['block']}, `{r['rule']}` | {r['sites']} | {r['params_equal']} ({r['params']:,}) "
            f"| {r['paper_allclose']} ({r['paper_max_abs_diff']:.1e}) "
            f"| {r['attention_matters_max_abs_diff']:.3g} | {r['identity_bitwise']} |"
        )


if __name__ == "__main__":
    main()
