"""Names users look for: a branch_end block takes timm's empty attention slot (``self.se = None``)."""

import pytest
import timm
import torch

from attn_inject import eject, inject
from attn_inject.testing import look_trained


@pytest.mark.parametrize(
    "base,block,hand_written", [("resnet50", "se", "seresnet50"), ("resnet50d", "eca", "ecaresnet50d")]
)
def test_injected_keys_are_those_of_timms_hand_written_variant(base, block, hand_written):
    model = look_trained(timm.create_model(base))
    x = torch.randn(1, 3, 96, 96)
    before = model(x)
    original = dict(model.state_dict())
    inject(model, block, "bottleneck", example_input=x)
    new = {k: v.shape for k, v in model.state_dict().items() if k not in original}
    reference = timm.create_model(hand_written).state_dict()
    expected = {k: v.shape for k, v in reference.items() if k not in original}
    assert len(new) == (64 if block == "se" else 16) and new == expected
    assert model.layer1[0].se.__class__.__name__ != "NoneType"
    # a checkpoint of the hand-written model loads by name into the injected one
    model.load_state_dict({k: reference[k] for k in new}, strict=False)
    eject(model)
    assert model.layer1[0].se is None and list(model.state_dict()) == list(original)
    assert torch.equal(model(x), before)


def test_other_positions_and_models_without_a_slot_keep_the_block_name():
    model = timm.create_model("resnet18").eval()
    inject(model, "eca", "basic", position="block_output", example_input=torch.randn(1, 3, 64, 64))
    assert model.layer1[0].se is None and hasattr(model.layer1[0], "eca_out")
    import torchvision

    tv = torchvision.models.resnet18().eval()
    inject(tv, "se", "basic", example_input=torch.randn(1, 3, 64, 64))
    assert "layer1.0.se.fc1.weight" in tv.state_dict()
    inject(tv, "se", "basic", example_input=torch.randn(1, 3, 64, 64), stack=True)  # a second SE: the name is taken
    assert "layer1.0.se_1.fc1.weight" in tv.state_dict()
