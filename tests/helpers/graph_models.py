"""Hand-written models whose data flow crosses module boundaries: residual branches that start in
a parent (transformers' EfficientNet), merges of different maps (LR-ASPP, FPN), a train-only op
(stochastic depth) and an untraceable parent of conv units (transformers' MobileNetV1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_act(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.SiLU()
    )


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.reduce = nn.Conv2d(c, 4, 1)
        self.expand = nn.Conv2d(4, c, 1)

    def forward(self, x):
        s = self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class FinalBlockLayer(nn.Module):
    """transformers' EfficientNetFinalBlockLayer: the add sees only the 1x1 projection of its branch."""

    def __init__(self, cin: int, cout: int, skip: bool):
        super().__init__()
        self.project_conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(cout)
        self.skip = skip

    def forward(self, embeddings, hidden_states):
        hidden_states = self.project_bn(self.project_conv(hidden_states))
        if self.skip:
            hidden_states = hidden_states + embeddings
        return hidden_states


class SplitMBConv(nn.Module):
    """transformers' EfficientNetBlock: expansion, depthwise and SE are siblings of the final layer."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.expansion = conv_bn_act(cin, mid)
        self.depthwise_conv = conv_bn_act(mid, mid, 3, stride, groups=mid)
        self.squeeze_excite = SqueezeExcite(mid)
        self.projection = FinalBlockLayer(mid, cout, skip=stride == 1 and cin == cout)

    def forward(self, hidden_states):
        embeddings = hidden_states
        hidden_states = self.expansion(hidden_states)
        hidden_states = self.depthwise_conv(hidden_states)
        hidden_states = self.squeeze_excite(hidden_states)
        return self.projection(embeddings, hidden_states)


class SplitEfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 8, 3, 2)
        self.blocks = nn.Sequential(SplitMBConv(8, 8), SplitMBConv(8, 16, 2), SplitMBConv(16, 16), SplitMBConv(16, 16))

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = (
            conv_bn_act(c, c, 3),
            nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)),
        )

    def forward(self, x):
        return F.relu(x + self.conv2(self.conv1(x)))


class Stages(nn.Module):
    """A backbone returning its stage outputs in a dict (torchvision's IntermediateLayerGetter)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 8, 3, 2)
        self.layer1 = ResidualBlock(8)
        self.down = conv_bn_act(8, 16, 3, 2)
        self.layer2 = ResidualBlock(16)

    def forward(self, x):
        low = self.layer1(self.stem(x))
        high = self.layer2(self.down(low))
        return {"low": low, "high": high}


class LRASPPLikeHead(nn.Module):
    """torchvision's LRASPPHead: two classifiers on different maps, summed (a merge)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.cbr = conv_bn_act(16, 8)
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 8, 1), nn.Sigmoid())
        self.low_classifier = nn.Conv2d(8, classes, 1)
        self.high_classifier = nn.Conv2d(8, classes, 1)

    def forward(self, features: dict):
        low, high = features["low"], features["high"]
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class LRASPPLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Stages()
        self.classifier = LRASPPLikeHead()

    def forward(self, x):
        return self.classifier(self.backbone(x))


class TopDownFPN(nn.Module):
    """An FPN's top-down path over a list of stage outputs: ``lateral(c) + upsample(p)``."""

    def __init__(self, channels: tuple[int, int], out: int = 8):
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out, 1, bias=False), nn.BatchNorm2d(out)) for c in channels
        )
        self.smooth = nn.Conv2d(out, out, 3, padding=1)

    def forward(self, features: list):
        top = self.lateral[1](features[1])
        merged = self.lateral[0](features[0]) + F.interpolate(top, size=features[0].shape[-2:], mode="nearest")
        return self.smooth(merged), top


class ListStages(Stages):
    def forward(self, x):
        return list(super().forward(x).values())


class BackboneWithFPNLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = ListStages()
        self.fpn = TopDownFPN((8, 16))

    def forward(self, x):
        p3, p4 = self.fpn(self.body(x))
        return p3.mean((2, 3)) + p4.mean((2, 3))


class StochasticDepthBlock(nn.Module):
    """Stochastic depth written out in the forward, as in many repos: an add that exists in train
    mode only comes before the residual add and shifts fx's node names."""

    def __init__(self, c: int, drop: float = 0.25):
        super().__init__()
        self.conv1, self.conv2 = (
            conv_bn_act(c, c, 3),
            nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)),
        )
        self.drop = drop

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        if self.training:
            keep_prob = 1 - self.drop
            mask = keep_prob + torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device)
            out = out / keep_prob * mask.floor_()
        return F.relu(x + out)


class StochasticDepthNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 8, 3, 2)
        self.blocks = nn.Sequential(StochasticDepthBlock(8), StochasticDepthBlock(8))

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


class TFPaddedConvLayer(nn.Module):
    """transformers' MobileNetV1ConvLayer: TF-"same" padding from ``int(x.shape[-2])`` makes the
    forward untraceable; the conv, norm and activation are its children."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU6()

    def forward(self, features):
        height, width = int(features.shape[-2]), int(features.shape[-1])
        k, s = self.convolution.kernel_size[0], self.convolution.stride[0]
        pad_h = max(k - s, 0) if height % s == 0 else max(k - height % s, 0)
        pad_w = max(k - s, 0) if width % s == 0 else max(k - width % s, 0)
        features = F.pad(features, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return self.activation(self.normalization(self.convolution(features)))


class TFPaddedMobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_stem = TFPaddedConvLayer(3, 8, stride=2)
        self.layer = nn.ModuleList(
            [
                TFPaddedConvLayer(8, 8, groups=8),
                TFPaddedConvLayer(8, 16, k=1),
                TFPaddedConvLayer(16, 16, stride=2, groups=16),
                TFPaddedConvLayer(16, 32, k=1),
            ]
        )

    def forward(self, x):
        x = self.conv_stem(x)
        for layer in self.layer:
            x = layer(x)
        return x.mean((2, 3))


class ResizingFPNLayer(nn.Module):
    """transformers' MaskFormerFPNLayer: the top-down map is resized to the lateral one and added."""

    def __init__(self, lateral: int, out: int = 8):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(lateral, out, 1, bias=False), nn.BatchNorm2d(out))
        self.block = conv_bn_act(out, out, 3)

    def forward(self, down, left):
        left = self.proj(left)
        down = F.interpolate(down, size=left.shape[-2:], mode="nearest")
        down += left
        return self.block(down)


class OneGraphFPN(Stages):
    """A backbone and a MaskFormer-style FPN layer in one graph: the lateral map ``c1`` also feeds
    the next stage, so the top-down and lateral paths fork from one tensor, as a residual's would."""

    def __init__(self):
        super().__init__()
        self.top = conv_bn_act(16, 8)
        self.fpn = ResizingFPNLayer(8)

    def forward(self, x):
        c1 = self.layer1(self.stem(x))
        c2 = self.layer2(self.down(c1))
        return self.fpn(self.top(c2), c1)
