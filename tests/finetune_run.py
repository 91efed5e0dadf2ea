"""Fine-tune the tiny GroupNorm net on a folder; run by the tests under python and under torchrun.

    python tests/finetune_run.py DATA OUT.safetensors SUMMARY.json
"""

import json
import sys
from pathlib import Path

import torch
from finetune_data import TinyNet, looks_trained
from safetensors.torch import save_file

from attn_inject import inject
from attn_inject.finetune import distributed
from attn_inject.finetune.loop import TrainConfig, finetune
from attn_inject.safe_output import atomic_write

CONFIG = dict(epochs=2, batch_size=8, lr=1e-2, attention_lr=3e-2, warmup_steps=2, attention_only_steps=2, clip_grad=1.0)


def tiny_model(kind: str = "gn") -> torch.nn.Module:
    torch.manual_seed(0)
    model = looks_trained(TinyNet(kind=kind))
    return inject(model, "eca", after="basic", example_input=torch.randn(1, 3, 16, 16))


def save_weights(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def main(data: str, output: str, summary_path: str) -> None:
    torch.set_num_threads(1)
    context = distributed.setup("cpu")
    try:
        summary = finetune(tiny_model(), data, TrainConfig(**CONFIG), output=Path(output), save_model=save_weights, context=context)
        if context.is_main:
            Path(summary_path).write_text(json.dumps(summary))
    finally:
        distributed.teardown(context)


if __name__ == "__main__":
    main(*sys.argv[1:])
