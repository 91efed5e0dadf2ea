"""Files written before the package re-layout (at commit 3238b9d, by tests/fixtures/make_pre_layout.py)
still load and compute bit for bit the same: the .safetensors file through load(), and a full
torch.save pickle, whose objects name the old flat module paths (attn_inject.splice, .recipe, ...).

Bit for bit against the same model rebuilt today (timm, the two injections of the fixture script,
the file's tensors loaded into it) on this machine: a conv's last bits depend on the CPU's kernels,
so the output stored with the fixture (computed on the machine that wrote it) is matched within
float rounding only."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from attn_inject import eject, inject, load
from attn_inject.surgery.recipe import recipe_of

FIXTURES = Path(__file__).parent / "fixtures"
SITES = [
    "layer1.0.se", "layer2.0.se", "layer3.0.se", "layer4.0.se",
    "layer4.0.conv1_se", "layer4.0.conv2_se", "layer4.0.downsample.1_se",
]  # fmt: skip


def io() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's input and the output of the model rebuilt today from the file's tensors."""
    stored = load_file(str(FIXTURES / "pre_layout_io.safetensors"))
    model = timm.create_model("test_resnet", num_classes=10).eval()
    inject(model, "eca", after="residual")
    inject(model, "se", after="conv", include=["layer4.*"], reduction=4)
    model.load_state_dict(load_file(str(FIXTURES / "pre_layout.safetensors")))
    with torch.no_grad():
        expected = model(stored["input"])
    torch.testing.assert_close(expected, stored["output"], rtol=1e-5, atol=1e-5)  # what it computed then
    return stored["input"], expected


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
