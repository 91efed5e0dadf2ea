import pytest
import torch

from attn_inject import AttnInjectError, list_blocks
from attn_inject.blocks import (
    EfficientChannelAttention,
    SqueezeExcite,
    check_block_options,
    eca_kernel_size,
    get_block,
)
from attn_inject.blocks.gate import CENTRED, apply_gate

SHAPES = [(2, 64, 7, 7), (1, 256, 14, 9), (3, 24, 1, 1), (4, 2048, 3, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_registry_lists_and_rejects_unknown_names():
    assert list_blocks() == ["cbam", "coord", "eca", "gc", "gct", "ge", "se", "simam"]
    assert get_block("se") is SqueezeExcite
    with pytest.raises(
        AttnInjectError, match=r"unknown block 'bam'.*Valid blocks: cbam, coord, eca, gc, gct, ge, se, simam\."
    ):
        get_block("bam")


def test_unknown_block_option_lists_the_valid_ones():
    with pytest.raises(
        AttnInjectError,
        match=r"block 'eca' has no option 'reduction'.*Its options: gamma, beta, kernel_size, spatial_dims, init\.",
    ):
        check_block_options("eca", {"reduction": 8})


@pytest.mark.parametrize("channels,k", [(64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7), (4, 1), (24, 3)])
def test_eca_kernel_size_follows_the_paper(channels, k):
    assert eca_kernel_size(channels) == k
    assert EfficientChannelAttention(channels).conv.kernel_size == (k,)


def test_eca_kernel_options():
    assert EfficientChannelAttention(256, gamma=1, beta=1).conv.kernel_size == (9,)
    assert EfficientChannelAttention(256, kernel_size=3).conv.kernel_size == (3,)
    assert EfficientChannelAttention(256).conv.bias is None  # the paper's conv has no bias
    with pytest.raises(AttnInjectError, match="odd kernel_size"):
        EfficientChannelAttention(256, kernel_size=4)


@pytest.mark.parametrize("channels,rd", [(64, 8), (256, 16), (512, 32), (2048, 128), (24, 8), (100, 8)])
def test_se_reduced_width_is_a_multiple_of_8_and_at_least_8(channels, rd):
    se = SqueezeExcite(channels)
    assert se.fc1.out_channels == rd and se.fc2.in_channels == rd
    assert sum(p.numel() for p in se.parameters()) == 2 * channels * rd + rd + channels


def test_se_options():
    assert SqueezeExcite(256, reduction=4).fc1.out_channels == 64
    assert SqueezeExcite(256, rd_channels=10).fc1.out_channels == 10
    with pytest.raises(AttnInjectError, match="reduction > 0"):
        SqueezeExcite(256, reduction=0)
    with pytest.raises(AttnInjectError, match=r"unknown init 'zero'.*Valid inits: identity, paper\."):
        SqueezeExcite(256, init="zero")


@pytest.mark.parametrize("name", ["se", "eca"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_identity_init_is_bitwise_identity(name, dtype, shape, channels_last):
    block = get_block(name)(shape[1]).to(dtype).eval()
    x = torch.randn(shape).to(dtype) * 10
    x[:, :, 0, 0] = -0.0  # signed zeros must come back as they went in (compared bitwise below)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = block(x)
    assert y.dtype == dtype
    assert torch.equal(y, x)
    assert torch.equal(
        y.view(torch.int16 if dtype != torch.float32 else torch.int32),
        x.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["se", "eca"])
def test_paper_init_scales_by_about_a_half(name):
    block = get_block(name)(64, init="paper").eval()
    x = torch.rand(2, 64, 5, 5) + 1
    ratio = (block(x) / x).detach()
    assert not torch.equal(block(x), x)
    assert 0.3 < ratio.mean().item() < 0.7


@pytest.mark.parametrize("name", ["se", "eca"])
def test_identity_block_jacobian_is_identity_and_last_layer_learns(name):
    block = get_block(name)(32)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    g = torch.randn(2, 32, 6, 6)
    (block(x) * g).sum().backward()
    assert torch.equal(x.grad, g)  # d(block)/dx is the identity at insertion
    last = block.fc2.weight if name == "se" else block.conv.weight
    assert last.grad is not None and last.grad.abs().sum() > 0


GATES = [torch.sigmoid, torch.nn.functional.hardsigmoid]


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gain_two_gate_with_a_gradient_is_the_plain_gate_forward_bitwise_and_backward(gate, dtype):
    """Where autograd is on, the gate is GainTwoGate: the same output bits as the plain addcmul,
    gradients equal to autograd's of it (to rounding), keeping only x and z for backward."""
    x = (torch.randn(4, 32, 5, 5) * 4).to(dtype).requires_grad_()
    z = (torch.randn(4, 32, 1, 1) * 4).to(dtype).requires_grad_()
    g = torch.randn(4, 32, 5, 5).to(dtype)
    out = apply_gate(x, z, 2.0, gate)
    plain = torch.addcmul(x, x, CENTRED[gate].forward(z))
    assert (
        type(out.grad_fn).__name__ == "GainTwoGateBackward"
        and type(plain.grad_fn).__name__ != type(out.grad_fn).__name__
    )
    assert torch.equal(out, plain)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is x and saved[1] is z  # timm's x * gate(z) keeps x and gate(z)
    ours, autograds = torch.autograd.grad(out, (x, z), g), torch.autograd.grad(plain, (x, z), g)
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for a, b in zip(ours, autograds, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance * b.abs().max().item())


@pytest.mark.parametrize("gate", GATES)
def test_gain_two_gate_has_exact_first_and_second_derivatives(gate):
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    z = (torch.randn(2, 4, 1, 1, dtype=torch.float64) * 2).requires_grad_()  # |z| < 3 and > 3: both hard-sigmoid sides
    assert torch.autograd.gradcheck(lambda a, b: apply_gate(a, b, 2.0, gate), (x, z))
    assert torch.autograd.gradgradcheck(lambda a, b: apply_gate(a, b, 2.0, gate), (x, z))


def test_gain_two_gate_without_a_gradient_is_the_plain_addcmul():
    x, z = torch.randn(2, 8, 3, 3, requires_grad=True), torch.randn(2, 8, 1, 1)
    with torch.no_grad():
        assert apply_gate(x, z, 2.0).grad_fn is None
    assert apply_gate(x.detach(), z, 2.0).grad_fn is None
    assert type(apply_gate(x, z, 2.0).grad_fn).__name__ == "GainTwoGateBackward"
