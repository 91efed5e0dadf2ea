"""Part (a) of benchmarks/finetune.py in a few minutes: train a small ResNet on sklearn's digits,
inject identity-init ECA and SE, fine-tune each (and the plain model) for the same steps, one seed.

    .venv/bin/python -m examples.finetune_digits          # from the repository root; about 3 minutes on 2 CPU cores

Step 0 of the injected models is the base model exactly (same accuracy, same loss); the full
benchmark (3 seeds, the paper init, EfficientNet-Lite0 transfer) is ``python -m benchmarks.finetune``.
"""

import tempfile
from pathlib import Path

import timm
import torch

from attn_inject.finetune.loop import TrainConfig
from benchmarks.finetune import DIGIT_AUGMENT, run_finetune, with_attention, write_digits

EPOCHS = 2
COMMON = dict(epochs=EPOCHS, batch_size=64, img_size=32, train_transform=DIGIT_AUGMENT, seed=0)

with tempfile.TemporaryDirectory() as tmp:
    data = write_digits(Path(tmp) / "digits")
    work = Path(tmp) / "runs"
    work.mkdir()
    torch.manual_seed(0)
    base = timm.create_model("resnet10t", num_classes=10)
    base_curve = run_finetune(base, data, TrainConfig(lr=2e-3, warmup_steps=10, **COMMON), work / "base.safetensors")[
        "curve"
    ]
    print(f"base, trained from scratch for {base_curve[-1]['step']} steps: top1 {base_curve[-1]['top1']:.4f}")
    for name, variant in {"none": None, "eca": ("eca", "identity"), "se": ("se", "identity")}.items():
        model = with_attention(base, variant, "basic", 32, seed=0)
        curve = run_finetune(
            model, data, TrainConfig(lr=5e-4, attention_lr=5e-3, **COMMON), work / f"{name}.safetensors"
        )["curve"]
        start, end = curve[0], curve[-1]
        same = start["top1"] == base_curve[-1]["top1"] and start["loss"] == base_curve[-1]["loss"]
        print(
            f"{name:>4}: step 0 top1 {start['top1']:.4f} (= base: {same}) "
            f"-> {end['top1']:.4f} after {end['step']} more steps"
        )
