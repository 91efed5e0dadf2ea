"""A real small patched file, its adapter and its base checkpoint, for the hostile-file tests and the
file fuzzer: timm's tiny ``test_resnet`` with weights that look trained, ECA after every residual
(4 blocks) moved off its identity init, recorded at a 32x32 example input."""

from __future__ import annotations

from pathlib import Path

import torch

from attn_inject import inject, save
from attn_inject.files.arch import create_model
from attn_inject.files.checkpoints import load_pretrained
from attn_inject.testing import look_trained, move_off_identity

ARCH = "test_resnet"
EXAMPLE = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))


def write_small_files(folder: Path) -> dict[str, Path]:
    """``base.pth`` (plain), ``model.safetensors`` (patched) and ``adapter.safetensors`` in ``folder``."""
    torch.manual_seed(0)
    base = folder / "base.pth"
    torch.save(look_trained(create_model(ARCH)).state_dict(), base)
    model = inject(load_pretrained(base, ARCH), "eca", "residual", example_input=EXAMPLE)
    move_off_identity(model)
    return {
        "base": base,
        "model": save(model, folder / "model.safetensors"),
        "adapter": save(model, folder / "adapter.safetensors", adapter_only=True),
    }
