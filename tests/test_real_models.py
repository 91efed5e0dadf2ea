"""Real timm and torchvision architectures (untrained weights; nothing is downloaded)."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from attn_inject import inject, plan
from attn_inject.blocks import EfficientChannelAttention, SqueezeExcite, eca_kernel_size
from attn_inject.testing import look_trained

# (name, factory, rule, sites, parameters ECA adds, sites that already hold the model's own SE: stack=True)
ARCHS = [
    ("timm:resnet18", lambda: timm.create_model("resnet18"), "basic", 8, 36, 0),
    ("timm:resnet50", lambda: timm.create_model("resnet50"), "bottleneck", 16, 86, 0),
    ("timm:resnext50_32x4d", lambda: timm.create_model("resnext50_32x4d"), "bottleneck", 16, 86, 0),
    ("timm:regnetx_002", lambda: timm.create_model("regnetx_002"), "bottleneck", 13, 61, 0),
    ("timm:efficientnet_b0", lambda: timm.create_model("efficientnet_b0"), "inverted_residual", 9, 33, 9),
    ("timm:efficientnet_lite0", lambda: timm.create_model("efficientnet_lite0"), "inverted_residual", 9, 33, 0),
    ("timm:mobilenetv3_large_100", lambda: timm.create_model("mobilenetv3_large_100"), "inverted_residual", 10, 34, 5),
    ("timm:convnext_atto", lambda: timm.create_model("convnext_atto"), "residual", 12, 52, 0),
    ("torchvision:resnet18", lambda: torchvision.models.resnet18(), "basic", 8, 36, 0),
    ("torchvision:resnet50", lambda: torchvision.models.resnet50(), "bottleneck", 16, 86, 0),
    ("torchvision:mobilenet_v2", lambda: torchvision.models.mobilenet_v2(), "inverted_residual", 10, 34, 0),
    ("torchvision:efficientnet_b0", lambda: torchvision.models.efficientnet_b0(), "inverted_residual", 9, 33, 9),
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def se_params(c: int) -> int:  # 2 * C * rd + rd + C with rd = max(8, round(C / 16 to a multiple of 8))
    rd = max(8, int(c / 16 + 4) // 8 * 8)
    return 2 * c * rd + rd + c


@pytest.mark.parametrize("name,factory,rule,sites,eca_params,attended", ARCHS, ids=[a[0] for a in ARCHS])
@pytest.mark.parametrize("block", ["eca", "se"])
def test_real_architecture(name, factory, rule, sites, eca_params, attended, block):
    model = look_trained(factory())  # fresh timm ResNets zero the last norm of each branch
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
    original_params = n_params(model)
    stack = attended > 0  # a second block next to the model's own SE is asked for
    report = plan(model, block, after=rule, stack=stack)
    assert len(report) == sites and len(report.attended) == attended
    expected = eca_params if block == "eca" else sum(se_params(s.channels) for s in report)
    assert sum(eca_kernel_size(s.channels) for s in report) == eca_params
    assert report.params_added == expected

    patched = inject(model, block, after=rule, stack=stack)
    assert patched is model and n_params(model) == original_params + expected
    with torch.no_grad():
        assert torch.equal(model(x), before)

    # one training step runs and reaches every new block
    kind = EfficientChannelAttention if block == "eca" else SqueezeExcite
    blocks = [m for m in model.modules() if type(m) is kind]
    last_layers = [m.conv.weight if block == "eca" else m.fc2.weight for m in blocks]
    assert len(blocks) == sites
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(2, 3, 128, 128)), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for m in blocks for p in m.parameters())
    assert sum(w.grad.abs().sum() for w in last_layers) > 0
    optimizer.step()
    assert sum(w.abs().sum() for w in last_layers) > 0
    # without stochastic depth (eval mode) every block's last layer has a gradient at step 0
    model.eval().zero_grad()
    model(torch.randn(2, 3, 128, 128)).logsumexp(-1).sum().backward()
    assert all(w.grad.abs().sum() > 0 for w in last_layers)


def test_injected_se_resnet50_matches_timm_seresnet50_in_size():
    """SE after the bottleneck adds what timm's hand-written SE-ResNet-50 has (paper: +2.5 M)."""
    resnet = timm.create_model("resnet50")
    added = plan(resnet, "se", after="bottleneck").params_added
    assert added == n_params(timm.create_model("seresnet50")) - n_params(resnet) == 2_530_992
    resnet_d = timm.create_model("resnet50d")
    assert (
        plan(resnet_d, "eca", after="bottleneck").params_added
        == n_params(timm.create_model("ecaresnet50d")) - n_params(resnet_d)
        == 86
    )


def test_channels_last_model_is_patched_bitwise():
    model = timm.create_model("resnet18").eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 160, 160).to(memory_format=torch.channels_last)
    with torch.no_grad():
        before = model(x)
    inject(model, "se", after="basic", example_input=x[:1])
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_is_patched_bitwise(dtype):
    model = torchvision.models.resnet18().eval().to(dtype)
    x = torch.randn(2, 3, 96, 96).to(dtype)
    with torch.no_grad():
        before = model(x)
    inject(model, "eca", after="basic")  # example input follows the model's dtype
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_timm_model_keeps_its_api_and_feature_path():
    model = timm.create_model("resnet18", num_classes=7).eval()
    inject(model, "eca", after="conv")  # the stem unit lives in forward_features
    assert type(model).__name__ == "ResNet" and model.pretrained_cfg["architecture"] == "resnet18"
    assert "conv1_eca" in dict(model.named_children())
    with torch.no_grad():
        model.conv1_eca.conv.weight.fill_(1.0)
        x = torch.randn(1, 3, 64, 64)
        assert torch.equal(model.forward_head(model.forward_features(x)), model(x))
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
