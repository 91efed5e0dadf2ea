"""Remembered meta kernels: a replayed call gives exactly the metadata the meta kernel gives."""

from __future__ import annotations

import pytest
import torch

from attn_inject.graph import meta_kernels
from attn_inject.graph.meta_kernels import call_meta

aten = torch.ops.aten
META = torch.device("meta")


@pytest.fixture(autouse=True)
def empty_table(monkeypatch):
    monkeypatch.setattr(meta_kernels, "_outputs", {})


def meta(*shape, dtype=torch.float32, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device=META)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def signature(result):
    outputs = (result,) if isinstance(result, torch.Tensor) else result
    return [(tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device) for t in outputs]


FUNCTIONAL = [
    (
        "batch norm, eval",
        aten.native_batch_norm.default,
        lambda: (meta(2, 8, 5, 5), meta(8), meta(8), meta(8), meta(8), False, 0.1, 1e-5),
    ),
    (
        "batch norm, train, channels_last",
        aten.native_batch_norm.default,
        lambda: (meta(2, 8, 5, 5, channels_last=True), meta(8), meta(8), meta(8), meta(8), True, 0.1, 1e-5),
    ),
    (
        "layer norm, bf16",
        aten.native_layer_norm.default,
        lambda: (meta(2, 7, 16, dtype=torch.bfloat16), [16], meta(16, dtype=torch.bfloat16), None, 1e-6),
    ),
    ("group norm", aten.native_group_norm.default, lambda: (meta(2, 8, 5, 5), meta(8), meta(8), 2, 8, 25, 4, 1e-5)),
    ("hardswish", aten.hardswish.default, lambda: (meta(1, 4, 3, 3, channels_last=True),)),
    ("add, broadcast", aten.add.Tensor, lambda: (meta(2, 8, 5, 5), meta(2, 8, 1, 1))),
    ("mul, half and float", aten.mul.Tensor, lambda: (meta(2, 8, dtype=torch.float16), meta(2, 8))),
    ("mean", aten.mean.dim, lambda: (meta(2, 8, 5, 5), [2, 3], True)),
    (
        "convolution",
        aten.convolution.default,
        lambda: (meta(1, 4, 9, 9), meta(6, 4, 3, 3), None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1),
    ),
]


@pytest.mark.parametrize(("what", "func", "make"), FUNCTIONAL, ids=[c[0] for c in FUNCTIONAL])
def test_a_replayed_call_has_the_meta_kernels_metadata(what, func, make):
    expected = signature(func(*make()))
    first = call_meta(func, make(), {})
    assert len(meta_kernels._outputs) == 1, what  # remembered
    replayed = call_meta(func, make(), {})
    assert signature(first) == expected
    assert signature(replayed) == expected
    assert type(replayed) is type(first)


def test_a_replayed_output_is_a_fresh_tensor():
    x = meta(2, 3)
    a = call_meta(aten.relu.default, (x,), {})
    b = call_meta(aten.relu.default, (x,), {})
    assert a is not b and b is not x


def test_an_in_place_call_returns_its_first_argument():
    x = meta(2, 8, 5, 5)
    assert call_meta(aten.hardswish_.default, (x,), {}) is x
    y = meta(2, 8, 5, 5)
    assert call_meta(aten.hardswish_.default, (y,), {}) is y  # replayed
    assert len(meta_kernels._outputs) == 1


def test_a_call_that_raised_raises_again():
    bad = (meta(2, 3), meta(4, 5))
    for _ in range(2):
        with pytest.raises(RuntimeError):
            call_meta(aten.add.Tensor, bad, {})
    with pytest.raises(RuntimeError):  # an in-place add that would grow its first argument
        call_meta(aten.add_.Tensor, (meta(1, 3), meta(4, 3)), {})
    assert meta_kernels._outputs == {}


def test_values_of_another_type_or_sign_are_other_calls():
    x = meta(3)
    for other in (1, 1.0, True, 0.0, -0.0):
        call_meta(aten.add.Tensor, (x, x), {"alpha": other})
    assert len(meta_kernels._outputs) == 5
    assert call_meta(aten.add.Tensor, (meta(3, dtype=torch.int64), 2.5), {}).dtype == torch.float32


@pytest.mark.parametrize(
    ("func", "args"),
    [
        (aten.view.default, (meta(2, 6), [3, 4])),  # a view of its input
        (aten.add.Tensor, (torch.zeros(3), torch.zeros(3))),  # real tensors
        (aten.resize_.default, (meta(3), [5])),  # changes its input's shape
        (aten.bernoulli.default, (meta(3),)),  # draws random numbers
    ],
)
def test_calls_that_cannot_be_replayed_are_not_remembered(func, args):
    call_meta(func, args, {})
    assert meta_kernels._outputs == {}
