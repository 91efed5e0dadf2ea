"""Small hand-written models covering the shapes of code the rewriter must handle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class InplaceBasic(nn.Module):
    """torchvision style: ``out += identity`` and an in-place ReLU shared three ways."""

    def __init__(self, c: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c if stride == 1 else c // 2, c, 3, stride)
        self.conv2, self.bn2 = conv_bn(c, c)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(*conv_bn(c // 2, c, 1, stride)) if stride != 1 else None

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchAddBottleneck(nn.Module):
    """``torch.add`` residual, functional activation."""

    def __init__(self, c: int, mid: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c, mid, 1)
        self.conv2, self.bn2 = conv_bn(mid, mid, 3)
        self.conv3, self.bn3 = conv_bn(mid, c, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(torch.add(self.bn3(self.conv3(y)), x))


class MethodAddInverted(nn.Module):
    """``out.add_(x)`` whose result is used only through mutation; branch in an nn.Sequential."""

    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        hidden = c * expand
        self.conv = nn.Sequential(
            *conv_bn(c, hidden, 1),
            nn.ReLU6(inplace=True),
            *conv_bn(hidden, hidden, 3, groups=hidden),
            nn.ReLU6(inplace=True),
            *conv_bn(hidden, c, 1),
        )

    def forward(self, x):
        out = self.conv(x)
        out.add_(x)
        return out


class BranchyNet(nn.Module):
    """A top-level forward that branches on a tensor value: fx cannot trace it, its blocks it can."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16), nn.ReLU(inplace=True))
        self.block1 = InplaceBasic(16)
        self.block2 = TorchAddBottleneck(16, 8)
        self.block3 = MethodAddInverted(16)
        self.block4 = InplaceBasic(32, stride=2)
        self.head = nn.Linear(32, num_classes)
        self.answer = 42  # a plain attribute that must survive

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > -1e9:  # data-dependent control flow
            x = self.block1(x)
        x = self.block3(self.block2(x))
        x = self.block4(x)
        return self.head(x.mean((2, 3)))

    def features(self, x):  # a method that must survive
        return self.block1(self.stem(x))


class SharedShortcutBlock(nn.Module):
    """DLA style: called with and without a shortcut argument."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c, c)
        self.conv2, self.bn2 = conv_bn(c, c)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + shortcut)


class TwoCallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.a = SharedShortcutBlock(8)
        self.b = SharedShortcutBlock(8)

    def forward(self, x):
        x = self.stem(x)
        y = self.a(x)
        return self.b(y, shortcut=x).mean((2, 3))


class TrainModeBlock(nn.Module):
    """A forward whose traced graph differs between train and eval (functional dropout)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = conv_bn(c, c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.training:
            y = F.dropout(y, 0.1, training=True)
        return x + y


def sequential_resnet() -> nn.Sequential:
    """An nn.Sequential model: stem units and basic blocks."""
    return nn.Sequential(
        *conv_bn(3, 16),
        nn.ReLU(inplace=True),
        InplaceBasic(16),
        InplaceBasic(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class ListBranches(nn.Module):
    """HRNet style: takes a list and updates it in place, a residual per branch."""

    def __init__(self, c: int):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(*conv_bn(c, c), nn.ReLU(), *conv_bn(c, c)) for _ in range(2))

    def forward(self, xs: list):
        for i, branch in enumerate(self.branches):
            xs[i] = xs[i] + branch(xs[i])
        return xs


class SizedPosConv(nn.Module):
    """Twins PosConv style: tokens and a size tuple in, a residual depthwise conv on the map."""

    def __init__(self, c: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c))

    def forward(self, x, size):
        b, _, c = x.shape
        feat = x.transpose(1, 2).reshape(b, c, *size)
        return (self.proj(feat) + feat).flatten(2).transpose(1, 2)


class RuntimeBoundForward(nn.Module):
    """FasterNet Partial_conv3 style: the forward is bound on the instance at construction."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = conv_bn(c, c)
        self.forward = self.forward_residual

    def forward_residual(self, x):
        return x + self.bn(self.conv(x))


class StructuredNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.lists = ListBranches(8)
        self.pos = SizedPosConv(8)
        self.bound = RuntimeBoundForward(8)

    def forward(self, x):
        x = self.stem(x)
        a, b = self.lists([x, x * 2])
        h, w = a.shape[2:]
        tokens = self.pos(a.flatten(2).transpose(1, 2), (h, w))
        a = tokens.transpose(1, 2).reshape(a.shape)
        return self.bound(a + x).mean((2, 3)) + b.mean((2, 3))  # a + b would be a merge, a + x is a residual


class KeywordOnlyNet(nn.Module):
    """A forward whose input is keyword-only (``model(pixel_values=x)``), as processors' outputs are passed."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.block = InplaceBasic(8)

    def forward(self, *, pixel_values, scale: float = 1.0):
        return self.block(self.stem(pixel_values)).mean((2, 3)) * scale


def keyword_only_net() -> nn.Module:
    """A factory for ``load(path, arch="tests.helpers.tiny_models:keyword_only_net")``."""
    return KeywordOnlyNet()


class CountingNet(nn.Module):
    """A residual net whose forward counts its calls in a buffer, in eval mode too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8))
        self.block = InplaceBasic(8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.block(self.stem(x))


def counting_net() -> nn.Module:
    return CountingNet()
