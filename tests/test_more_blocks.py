"""CBAM, coordinate attention, GCT, global context, gather-excite and SimAM: exact identity at
insertion in every float format and memory layout, a gradient for the zeroed layers at step 0, the
paper init, N-D forms, options checked, parameter counts equal to timm's."""

from __future__ import annotations

import pytest
import torch
from timm.layers import get_attn

from attn_inject import AttnInjectError
from attn_inject.blocks import block_spec, check_block_options, get_block
from attn_inject.blocks.registry import SITE_FACTS
from attn_inject.testing import look_trained

# (block, options, zeroed gate parameters that learn at step 0): each way the identity comes about
VARIANTS = [
    ("cbam", {}, ["channel.fc2.weight", "spatial.norm.weight", "spatial.norm.bias"]),
    ("coord", {}, ["conv_h.weight", "conv_h.bias", "conv_w.weight", "conv_w.bias"]),
    ("coord", {"rd_ratio": 1 / 24, "bias": False}, ["conv_h.weight", "conv_w.weight"]),  # timm's CoordAttn widths
    ("gct", {}, ["gamma", "beta"]),
    ("gct", {"mode": "l1"}, ["gamma", "beta"]),
    ("gc", {}, ["mlp_scale.fc2.weight", "mlp_scale.fc2.bias"]),
    ("gc", {"fuse_add": True, "fuse_scale": False}, ["mlp_add.fc2.weight", "mlp_add.fc2.bias"]),  # timm "gca"
    (
        "gc",
        {"use_attn": False, "fuse_add": True},
        [f"mlp_{k}.fc2.{p}" for k in ("add", "scale") for p in ("weight", "bias")],
    ),
    ("ge", {}, ["mlp.fc2.weight", "mlp.fc2.bias"]),  # timm "ge": global gather + mlp
    ("ge", {"extent": 2, "use_mlp": False}, ["alpha"]),  # θ⁻: parameter-free, through alpha
    ("ge", {"extent": 4, "extra_params": True, "use_mlp": False}, ["gather.norm2.weight", "gather.norm2.bias"]),  # θ
    ("ge", {"extent": 2, "extra_params": True, "add_maxpool": True}, ["mlp.fc2.weight", "mlp.fc2.bias"]),  # θ⁺
    ("simam", {}, ["alpha"]),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items()) or 'default'}" for name, options, _ in VARIANTS]
SHAPES = [(2, 32, 7, 5), (3, 24, 1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def is_additive(name: str, options: dict) -> bool:
    """x + 0 forms: a negative zero may come back positive, every other value keeps its bits."""
    return (
        name == "simam"
        or (name == "ge" and options.get("extent") == 2 and options.get("use_mlp") is False)
        or (name == "gc" and bool(options.get("fuse_add")))
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("name,options,_", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_identity_init_is_bitwise_identity(name, options, _, dtype, shape, channels_last):
    block = get_block(name)(shape[1], **options).to(dtype).eval()
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 10).to(dtype)
    x[:, :, 0, 0] = -0.0
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = block(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x)
    nonzero = x != 0
    assert torch.equal(bits(y)[nonzero], bits(x)[nonzero])
    if not is_additive(name, options):
        assert torch.equal(bits(y), bits(x))  # signed zeros too


@pytest.mark.parametrize("name,options,zeroed", VARIANTS, ids=IDS)
def test_zeroed_layers_learn_at_step_0_and_the_jacobian_is_the_identity(name, options, zeroed):
    block = get_block(name)(32, **options)
    params = dict(block.named_parameters())
    assert set(zeroed) <= set(block_spec(name).gate_parameters(block))
    assert not any(params[n].any() for n in zeroed)
    x = torch.randn(2, 32, 8, 6, requires_grad=True)
    g = torch.randn(2, 32, 8, 6)
    (block(x) * g).sum().backward()
    assert torch.equal(x.grad, g)
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in zeroed)


@pytest.mark.parametrize("name,options,_", VARIANTS, ids=IDS)
def test_moved_off_identity_the_block_changes_its_input(name, options, _):
    block = get_block(name)(32, **options).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    x = torch.randn(2, 32, 8, 6)
    with torch.no_grad():
        assert not torch.equal(block(x), x)


PAPER_IDENTITY = ("gct", "gc-fuse_add=True-fuse_scale=False")  # the paper's own init is the identity


@pytest.mark.parametrize(
    "name,options,_",
    [v for v, i in zip(VARIANTS, IDS) if not i.startswith(PAPER_IDENTITY)],
    ids=[i for i in IDS if not i.startswith(PAPER_IDENTITY)],
)
def test_paper_init_is_the_plain_block(name, options, _):
    block = get_block(name)(32, **options, init="paper").eval()
    assert not hasattr(block, "alpha") or block.alpha is None
    x = torch.rand(2, 32, 8, 6) + 1
    with torch.no_grad():
        assert not torch.equal(block(x), x)


def test_gct_and_gcnet_paper_inits_are_their_own_identity():
    block = get_block("gct")(32, init="paper")
    assert block.alpha.eq(1).all() and not block.gamma.any() and not block.beta.any()
    x = torch.randn(2, 32, 5, 5)
    assert torch.equal(block(x), x)
    gcnet = get_block("gc")(32, fuse_add=True, fuse_scale=False, init="paper")
    assert not gcnet.mlp_add.fc2.weight.any() and gcnet.conv_attn.weight.any()
    assert torch.equal(gcnet(x), x)


@pytest.mark.parametrize("channels", [64, 256, 2048])
@pytest.mark.parametrize("rd_ratio", [1 / 16, 1 / 8])
def test_cbam_has_timms_parameters(channels, rd_ratio):
    ours, timms = get_block("cbam")(channels, rd_ratio=rd_ratio), get_attn("cbam")(channels, rd_ratio=rd_ratio)
    assert [tuple(t.shape) for t in ours.state_dict().values()] == [tuple(t.shape) for t in timms.state_dict().values()]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in timms.parameters())


@pytest.mark.parametrize(
    "name,options,timm_name,timm_options",
    [
        ("gc", {}, "gc", {}),
        ("gc", {"fuse_add": True, "fuse_scale": False}, "gca", {}),
        ("coord", {"rd_ratio": 1 / 16 * 2 / 3, "bias": False}, "coord", {}),
    ],
)
@pytest.mark.parametrize("channels", [64, 256, 1536])
def test_layouts_equal_timms(name, options, timm_name, timm_options, channels):
    ours, timms = get_block(name)(channels, **options), get_attn(timm_name)(channels, **timm_options)
    assert [tuple(t.shape) for t in ours.state_dict().values()] == [tuple(t.shape) for t in timms.state_dict().values()]


def test_coordinate_attention_widths_follow_the_authors_code():
    assert [get_block("coord")(c).conv1.out_channels for c in (64, 256, 512, 1024)] == [8, 8, 16, 32]
    assert get_block("coord")(256, reduction=16, min_mip=4).conv1.out_channels == 16
    block = get_block("coord")(256)
    assert sum(p.numel() for p in block.parameters()) == (256 * 8 + 8) + 2 * 8 + 2 * (8 * 256 + 256)


def test_gct_has_three_vectors_of_channels():
    assert sum(p.numel() for p in get_block("gct")(256).parameters()) == 3 * 256


@pytest.mark.parametrize("name", ["cbam", "gct", "gc", "ge", "simam"])
@pytest.mark.parametrize("shape", [(2, 16, 9), (2, 16, 4, 5, 3)])
def test_nd_forms(name, shape):
    dims = len(shape) - 2
    options = {"extent": 2, "extra_params": True} if name == "ge" else {}
    block = get_block(name)(16, spatial_dims=dims, **options).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(block(x), x)
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
        y = block(x)
    assert y.shape == x.shape and not torch.equal(y, x)


@pytest.mark.parametrize(
    "name,options,message",
    [
        (
            "coord",
            {"spatial_dims": 3},
            r"coordinate attention \(H and W axes\) works on maps with 2 spatial dims, not 3",
        ),
        ("cbam", {"spatial_dims": 4}, r"CBAM works on maps with 1 or 2 or 3 spatial dims, not 4"),
        ("cbam", {"spatial_kernel_size": 4}, r"CBAM needs an odd spatial_kernel_size >= 1; got 4"),
        ("cbam", {"rd_ratio": 0}, r"CBAM needs rd_ratio > 0"),
        ("gct", {"mode": "l3"}, r"unknown GCT mode 'l3'.*Valid modes: l2, l1\."),
        ("gc", {"fuse_add": False, "fuse_scale": False}, r"global context needs fuse_add or fuse_scale"),
        ("ge", {"extent": 3}, r"gather-excite needs extent 0 \(global\) or a power of 2 >= 2; got 3"),
        ("ge", {"extra_params": True}, r"global extent needs the map's size"),
        (
            "coord",
            {"act": "gelu"},
            r"unknown coordinate attention act 'gelu'.*Valid activations: relu, silu, hard_swish",
        ),
        ("simam", {"e_lambda": 0.0}, r"SimAM needs e_lambda > 0"),
        ("simam", {"init": "zero"}, r"unknown init 'zero'"),
        ("gct", {"epsilon": "1e-5"}, r"block 'gct': option epsilon='1e-5' must be float, not str"),
    ],
)
def test_options_are_checked(name, options, message):
    with pytest.raises(AttnInjectError, match=message):
        check_block_options(name, options)


def test_the_new_specs():
    expected = {
        "cbam": (("channel.fc2", "spatial.norm"), True),
        "coord": (("conv_h", "conv_w"), True),
        "gct": (("gamma", "beta"), True),
        "gc": (("mlp_scale.fc2", "mlp_add.fc2"), True),
        "ge": (("mlp.fc2", "gather.-1", "alpha"), True),
        "simam": ("alpha", True),
    }
    assert {name: (block_spec(name).gate, block_spec(name).fresh_output) for name in expected} == expected
    # the N-D branch adds the spatial_dims site fact, which every new block takes
    assert all(block_spec(name).site_facts == tuple(f for f in SITE_FACTS if f == "spatial_dims") for name in expected)


@pytest.mark.parametrize(
    "name,options,timm_name",
    [
        ("cbam", {}, "cbam"),
        ("gc", {}, "gc"),
        ("gc", {"fuse_add": True, "fuse_scale": False}, "gca"),
        ("coord", {"rd_ratio": 1 / 16 * 2 / 3, "bias": False}, "coord"),
    ],
)
def test_paper_init_with_timms_weights_computes_timms_block(name, options, timm_name):
    """The whole-model reconstructions (resnet50 with each, gcresnet33ts) are benchmarks/reconstruct.py
    cases, run by tests/test_placements.py with -m slow."""
    theirs = look_trained(get_attn(timm_name)(256)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    ours = get_block(name)(256, **options, init="paper").eval()
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values())))  # by order (cbam's names differ)
    x = torch.randn(2, 256, 9, 7, generator=torch.Generator().manual_seed(3)) * 5
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
