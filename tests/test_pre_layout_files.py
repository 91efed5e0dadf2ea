"""Files written before the package re-layout (at commit 3238b9d, by tests/fixtures/make_pre_layout.py)
still load and compute bit for bit the same: the .safetensors file through load(), and a full
torch.save pickle, whose objects name the old flat module paths (attn_inject.splice, .recipe, ...)."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import torch
from safetensors.torch import load_file

from attn_inject import eject, load
from attn_inject.surgery.recipe import recipe_of

FIXTURES = Path(__file__).parent / "fixtures"
SITES = [
    "layer1.0.se", "layer2.0.se", "layer3.0.se", "layer4.0.se",
    "layer4.0.conv1_se", "layer4.0.conv2_se", "layer4.0.downsample.1_se",
]  # fmt: skip


def io() -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(FIXTURES / "pre_layout_io.safetensors"))
    return tensors["input"], tensors["output"]


def test_a_safetensors_file_written_before_the_move_loads_bitwise():
    x, expected = io()
    model = load(FIXTURES / "pre_layout.safetensors")
    assert list(recipe_of(model).modules) == SITES
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_a_pickled_patched_model_from_before_the_move_loads_bitwise_and_ejects():
    x, expected = io()
    model = torch.load(FIXTURES / "pre_layout_model.pt", weights_only=False)  # our own fixture, trusted
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert list(recipe_of(model).modules) == SITES
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eject(model)  # the undo records pickled with it (old attn_inject.splice.Undo) still work
    assert set(model.state_dict()) == {k for k in before if not any(k.startswith(s + ".") for s in SITES)}
    with torch.no_grad():
        assert not torch.equal(model(x), expected)  # the blocks were off identity: taking them out matters


def test_copies_of_a_pickle_from_before_the_move_compute_the_same():
    """deepcopy, pickle and deepcopy again, of the torch.load()ed pre-move pickle (EMA and
    reparameterize_model copy what users load)."""
    x, expected = io()
    model = torch.load(FIXTURES / "pre_layout_model.pt", weights_only=False)  # our own fixture, trusted
    for step in (copy.deepcopy, pickled, copy.deepcopy):
        model = step(model)
        with torch.no_grad():
            assert torch.equal(model(x), expected)
    assert list(recipe_of(model).modules) == SITES


def pickled(model: torch.nn.Module) -> torch.nn.Module:
    buffer = BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # our own bytes
