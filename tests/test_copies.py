"""A patched model can be copied and pickled to any depth (deepcopy, torch.save / torch.load, and
chains of both): outputs stay bitwise the same, the blocks still train."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision

from attn_inject import inject
from attn_inject.finetune import attention_blocks
from attn_inject.testing import look_trained, move_off_identity

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def pickled(model: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # our own bytes


@pytest.mark.parametrize("chain", ["deepcopy", "pickle", "mixed"])
def test_copies_of_copies_compute_the_same_and_train(chain):
    model = look_trained(torchvision.models.resnet18(num_classes=10))
    inject(model, "eca", after="residual")
    move_off_identity(model)
    with torch.no_grad():
        expected = model(X)
    steps = {"deepcopy": [copy.deepcopy] * 3, "pickle": [pickled] * 3, "mixed": [copy.deepcopy, pickled, copy.deepcopy]}
    copied = model
    for step in steps[chain]:
        copied = step(copied)
        with torch.no_grad():
            assert torch.equal(copied(X), expected)
    assert len(attention_blocks(copied)) == 8
    copied.train()(X).sum().backward()
    assert all(p.grad is not None for block in attention_blocks(copied).values() for p in block.parameters())
