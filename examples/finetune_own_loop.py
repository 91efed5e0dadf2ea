"""The fine-tuning helpers in your own training loop: real ImageNet EfficientNet-Lite0 weights,
ECA injected, a new 10-class head, sklearn's digits; the new blocks and the head train alone for the
first steps, then everything.

    .venv/bin/python examples/finetune_own_loop.py        # about 30 s on 2 CPU cores
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from attn_inject import inject
from attn_inject.cli.demo import pretrained_lite0
from attn_inject.finetune import AttentionFirst, param_groups, set_trainable, trainable_summary


def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16  # (N, 1, 8, 8) in 0..1
    x = F.interpolate(x, size=size, mode="bilinear").expand(-1, 3, -1, -1)
    return (x - 0.5) / 0.25, torch.tensor(d.target)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


torch.manual_seed(0)
x, y = digits()
train_x, train_y, val_x, val_y = x[:1200], y[:1200], x[1200:], y[1200:]

model = pretrained_lite0()
model.reset_classifier(10)
model = inject(model, "eca", after="inverted_residual", example_input=val_x[:1])

set_trainable(model, "all")  # the optimizer holds every parameter; the schedule freezes some at first
optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, attention_lr=1e-2, weight_decay=0.05))
schedule = AttentionFirst(model, steps=10, also=["classifier"])  # the new head trains from the start
print(f"val accuracy before: {accuracy(model, val_x, val_y):.3f}")
for step in range(40):
    if schedule.update(step):
        print(f"step {step}: training {schedule.phase}: {trainable_summary(model)}")
    model.train()
    batch = torch.randint(0, len(train_x), (32,))
    loss = F.cross_entropy(model(train_x[batch]), train_y[batch], label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
print(f"val accuracy after 40 steps: {accuracy(model, val_x, val_y):.3f}")
