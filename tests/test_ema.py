"""timm's ModelEmaV3 of a patched model (it deep-copies the model): the average updates the blocks,
evaluates with them, and saves and loads like the model it averages."""

import io

import timm
import torch
import torchvision

from attn_inject import inject, load, save
from attn_inject.finetune import attention_blocks
from attn_inject.testing import blocks_not_run, look_trained, move_off_identity

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def test_model_ema_v3_of_a_patched_model_updates_evaluates_and_saves(tmp_path):
    model = look_trained(torchvision.models.resnet18(num_classes=10))
    inject(model, "eca", after="residual", example_input=X[:1])
    move_off_identity(model)
    ema = timm.utils.ModelEmaV3(model, decay=0.5)
    assert sorted(attention_blocks(ema.module)) == sorted(attention_blocks(model))
    before = {k: v.clone() for k, v in ema.module.state_dict().items() if "eca" in k}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.nn.functional.cross_entropy(model(X), torch.tensor([1, 2])).backward()
    optimizer.step()
    ema.update(model)
    trained = model.state_dict()
    for key, old in before.items():  # halfway between the old average and the trained weights
        assert torch.allclose(ema.module.state_dict()[key], (old + trained[key]) / 2)
        assert not torch.equal(ema.module.state_dict()[key], old)
    ema.module.eval()
    assert blocks_not_run(ema.module, X) == 0
    with torch.no_grad():
        averaged = ema.module(X)
    save(ema.module, tmp_path / "ema.safetensors")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "ema.safetensors", "torchvision:resnet18", num_classes=10)(X), averaged)
    buffer = io.BytesIO()
    torch.save(ema.module, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buffer, weights_only=False)(X), averaged)
