"""The N-D zoo: SE and ECA injected into 1-D and 3-D conv nets (audio, time series, video, medical
volumes) and the 2-D nets of the same libraries; sites, bitwise identity with trained-looking
weights, blocks run and moved off identity, inject time in forwards of the model; and SE parameter
counts against MONAI's own ``ChannelSELayer`` at the same channels.

    python -m benchmarks.nd_zoo                       # every model (about 10 minutes on 2 shared cores)
    python -m benchmarks.nd_zoo --only tv:r3d_18 monai:resnet18-1d
    python -m benchmarks.nd_zoo --quick                # the hand-written 1-D ResNet, for the tests

Each model runs in this process, with ``torch.set_num_threads(--threads)`` (default 1). Inject
time is the wall time of ``inject(...)`` (the example forward, the analysis, the splice) divided by
the median of three plain forwards of the same input. Places that hold channel attention already
are skipped (``inject``'s default) and counted; where every place holds one, the blocks are stacked
(``stack=True``) to test the surgery there. Results: benchmarks/results/nd_zoo.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchaudio
import torchvision
from monai.networks import nets as monai_nets
from monai.networks.blocks import ChannelSELayer
from torch import nn

from attn_inject import AttnInjectError, inject, plan
from attn_inject.blocks import EfficientChannelAttention, SqueezeExcite
from attn_inject.finetune import attention_blocks
from attn_inject.testing import blocks_not_run, look_trained, move_off_identity
from benchmarks.results_file import loadavg, write_results

DEFAULT_JSON = Path(__file__).parent / "results" / "nd_zoo.json"


def _resnet1d() -> nn.Module:
    """A hand-written 1-D ResNet for time series: stem, two basic blocks per stage, 3 stages."""

    class Basic(nn.Module):
        def __init__(self, cin: int, c: int, stride: int):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv1d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm1d(c)
            self.conv2, self.bn2 = nn.Conv1d(c, c, 3, 1, 1, bias=False), nn.BatchNorm1d(c)
            self.down = (
                None if stride == 1 and cin == c else nn.Sequential(nn.Conv1d(cin, c, 1, stride), nn.BatchNorm1d(c))
            )

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers: list[nn.Module] = [nn.Conv1d(1, 32, 7, 2, 3, bias=False), nn.BatchNorm1d(32), nn.ReLU()]
    for cin, c, stride in ((32, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)):
        layers.append(Basic(cin, c, stride))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(128, 5))


def _speechbrain(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        if name == "ecapa":
            from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

            return ECAPA_TDNN(80, lin_neurons=192)
        from speechbrain.lobes.models.ResNet import ResNet

        return ResNet(input_size=80)

    return build


@dataclass(frozen=True)
class Model:
    name: str
    dims: int  # spatial dims of its maps (1, 2 or 3)
    build: Callable[[], nn.Module]
    input: tuple[int, ...]
    rule: str = "residual"


VIDEO = (1, 3, 4, 32, 32)
VOLUME = (1, 1, 32, 32, 32)
MODELS = [
    Model("hand:resnet1d", 1, _resnet1d, (1, 1, 1024), "basic"),
    Model("monai:resnet18-1d", 1, lambda: monai_nets.resnet18(spatial_dims=1, n_input_channels=1, num_classes=2),
          (1, 1, 1024), "basic"),
    Model("speechbrain:ECAPA_TDNN", 1, _speechbrain("ecapa"), (1, 100, 80)),
    Model("torchaudio:ConvTasNet", 1, lambda: torchaudio.models.ConvTasNet(num_sources=2), (1, 1, 4000)),
    Model("torchaudio:Wav2Letter", 1, lambda: torchaudio.models.Wav2Letter(40, "waveform", 1), (1, 1, 4000), "conv"),
    Model("monai:resnet18-2d", 2, lambda: monai_nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=2),
          (1, 1, 64, 64), "basic"),
    Model("speechbrain:ResNet (TDNN)", 2, _speechbrain("resnet"), (1, 100, 80)),
    Model("tv:r3d_18", 3, lambda: torchvision.models.video.r3d_18(), VIDEO, "basic"),
    Model("tv:mc3_18", 3, lambda: torchvision.models.video.mc3_18(), VIDEO),
    Model("tv:r2plus1d_18", 3, lambda: torchvision.models.video.r2plus1d_18(), VIDEO),
    Model("tv:s3d", 3, lambda: torchvision.models.video.s3d(), (1, 3, 16, 224, 224), "conv"),
    Model("monai:resnet18-3d", 3, lambda: monai_nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2),
          VOLUME, "basic"),
    Model("monai:resnet50-3d", 3, lambda: monai_nets.resnet50(spatial_dims=3, n_input_channels=1, num_classes=2),
          VOLUME, "bottleneck"),
    Model("monai:SEResNet50-3d", 3, lambda: monai_nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=2),
          (1, 1, 64, 64, 64), "bottleneck"),
    Model("monai:SegResNet", 3, lambda: monai_nets.SegResNet(3, in_channels=1, out_channels=2, init_filters=8), VOLUME),
    Model("monai:UNet(res units 2)", 3,
          lambda: monai_nets.UNet(3, 1, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=2), VOLUME),
    Model("monai:DynUNet(res_block)", 3,
          lambda: monai_nets.DynUNet(3, 1, 2, kernel_size=[3] * 4, strides=[1, 2, 2, 2], upsample_kernel_size=[2] * 3,
                                     filters=[8, 16, 32, 64], res_block=True), VOLUME),
]  # fmt: skip


def forward_seconds(model: nn.Module, x: torch.Tensor) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_model(spec: Model) -> dict[str, Any]:
    torch.manual_seed(0)
    original = look_trained(spec.build().eval())
    x = torch.randn(spec.input, generator=torch.Generator().manual_seed(1))
    row: dict[str, Any] = {"model": spec.name, "dims": spec.dims, "input": list(x.shape), "rule": spec.rule}
    with torch.no_grad():
        reference = original(x)
    row["forward_s"] = round(forward_seconds(original, x), 4)
    for block in ("se", "eca"):
        model, result = copy.deepcopy(original), {}
        try:
            report = plan(model, block, after=spec.rule, example_input=x, stack=True)
            stack = len(report.attended) == len(report)
            result |= {"misses": len(report.misses), "attended": len(report.attended), "stacked": stack}
            result["untraced"] = len(report.untraced)
            start = time.perf_counter()
            inject(model, block, after=spec.rule, example_input=x, stack=stack)
            result["inject_s"] = round(time.perf_counter() - start, 3)
            result["inject_forwards"] = round(result["inject_s"] / row["forward_s"], 1)
            result["sites"] = len(attention_blocks(model))
            result["params_added"] = sum(p.numel() for b in attention_blocks(model).values() for p in b.parameters())
            result["maps"] = sorted({s.map_words.split(" ")[1] for s in report})
            with torch.no_grad():
                result["bitwise"] = bool(torch.equal(model(x), reference))
            result["not_run"] = blocks_not_run(model, x)
            move_off_identity(model)
            with torch.no_grad():
                result["moved_changes_output"] = not torch.equal(model(x), reference)
        except AttnInjectError as exc:
            result["refused"] = str(exc)[:400]
        row[block] = result
    return row


def parameter_counts() -> list[dict[str, Any]]:
    """SE parameters at the same channels: MONAI's ChannelSELayer (its default r=2, and r=16 as in
    its SEResNet50) against attn_inject's SE (defaults: reduction 16, rd_divisor 8; and rd_divisor=1)
    and ECA, all 3-D."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    rows = []
    for c in (64, 128, 256, 512, 1024, 2048):
        rows.append(
            {
                "channels": c,
                "monai_r2": count(ChannelSELayer(3, c)),
                "monai_r16": count(ChannelSELayer(3, c, r=16)),
                "se": count(SqueezeExcite(c, spatial_dims=3)),
                "se_rd_divisor_1": count(SqueezeExcite(c, rd_divisor=1, spatial_dims=3)),
                "eca": count(EfficientChannelAttention(c, spatial_dims=3)),
            }
        )
    return rows


def seresnet50_totals() -> dict[str, int]:
    """MONAI SEResNet50 (3-D)'s 16 SE layers against SE injected into MONAI's attention-free resnet50
    (3-D, rd_divisor=1): the same parameter count (the functions differ: benchmarks/reconstruct.py)."""
    se_net = monai_nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=2)
    monai_se = sum(p.numel() for m in se_net.modules() if isinstance(m, ChannelSELayer) for p in m.parameters())
    resnet50 = monai_nets.resnet50(spatial_dims=3, n_input_channels=1, num_classes=2).eval()
    report = plan(resnet50, "se", after="bottleneck", rd_divisor=1, example_input=torch.randn(VOLUME))
    return {"monai_seresnet50_se_params": monai_se, "injected_se_params": report.params_added, "sites": len(report)}


def cell(result: dict[str, Any]) -> str:
    if "refused" in result:
        return "refused"
    ok = result["bitwise"] and result["not_run"] == 0 and result["moved_changes_output"]
    stacked = ", stacked" if result["stacked"] and result["attended"] else ""
    return f"{result['sites']} ({'bitwise' if ok else 'NOT exact'}{stacked}), {result['inject_forwards']}"


def print_report(result: dict[str, Any]) -> None:
    print(f"threads {result['threads']}, load average before {result['load_before']}, after {result['load_after']}\n")
    print("| model | dims | input | rule | SE: sites (check), inject in forwards | ECA: same | maps | misses |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        maps = r["se"].get("maps") or r["eca"].get("maps") or []
        why = r["se"].get("refused", "")
        extra = f" {why[:140]}" if why else ""
        print(
            f"| {r['model']} | {r['dims']} | {'x'.join(map(str, r['input'][1:]))} | {r['rule']} | {cell(r['se'])} "
            f"| {cell(r['eca'])} | {', '.join(maps)} | {r['se'].get('misses', '-')}{extra} |"
        )
    print("\n| channels | MONAI ChannelSELayer r=2 | MONAI r=16 | se (defaults) | se rd_divisor=1 | eca |")
    print("|---|---|---|---|---|---|")
    for p in result["parameters"]:
        print(
            f"| {p['channels']} | {p['monai_r2']:,} | {p['monai_r16']:,} | {p['se']:,} | {p['se_rd_divisor_1']:,} "
            f"| {p['eca']} |"
        )
    if result.get("seresnet50"):
        t = result["seresnet50"]
        print(
            f"\nMONAI SEResNet50 (3-D) SE layers: {t['monai_seresnet50_se_params']:,} parameters; SE injected into "
            f"MONAI resnet50 (3-D, rd_divisor=1): {t['injected_se_params']:,} at {t['sites']} sites"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="MODEL", help="these models (names as in the table)")
    parser.add_argument("--quick", action="store_true", help="the hand-written 1-D ResNet only")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = ["hand:resnet1d"] if args.quick else args.only
    models = [m for m in MODELS if not only or m.name in only]
    before = loadavg()
    rows = [run_model(m) for m in models]
    result = {
        "torch": torch.__version__,
        "threads": args.threads,
        "load_before": before,
        "rows": rows,
        "parameters": parameter_counts(),
        "seresnet50": None if only else seresnet50_totals(),
        "load_after": loadavg(),
    }
    write_results(args.json, result, print_report)


if __name__ == "__main__":
    main()
