"""What trains, parameter groups and the summary, on injected tiny models."""

import pytest
import torch

from attn_inject import AttnInjectError, inject
from attn_inject.finetune import AttentionFirst, count_parameters, param_groups, set_trainable, trainable_summary
from attn_inject.testing import look_trained
from tests.helpers.finetune_data import TinyNet

X = torch.randn(1, 3, 16, 16)


def injected(block: str) -> torch.nn.Module:
    return inject(look_trained(TinyNet()), block, after="basic", example_input=X)


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_attention_only_trains_the_injected_blocks():
    model = injected("eca")
    set_trainable(model, "attention")
    assert trainable(model) == ["blocks.0.eca.conv.weight", "blocks.1.eca.conv.weight"]
    assert count_parameters(model) == (6, 2 * 3 + sum(p.numel() for p in TinyNet().parameters()))
    set_trainable(model, "all")
    assert trainable(model) == [n for n, _ in model.named_parameters()]


def test_set_trainable_refuses_bad_input():
    with pytest.raises(AttnInjectError, match="TinyNet has no injected attention blocks with parameters"):
        set_trainable(TinyNet(), "attention")
    with pytest.raises(AttnInjectError, match=r"unknown trainable set 'heads'\. Use one of: attention, all\."):
        set_trainable(injected("eca"), "heads")


def test_param_groups_split_learning_rate_and_weight_decay():
    model = injected("se")
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, attention_lr=1e-3, weight_decay=0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert members["model"] == sorted(
        ["stem.0.weight", "head.weight"] + [f"blocks.{i}.conv{j}.weight" for i in (0, 1) for j in (1, 2)]
    )
    assert members["attention"] == ["blocks.0.se.fc1.weight", "blocks.1.se.fc1.weight"]
    # no decay: biases and norms (1-d), and the layer feeding each gate (SE fc2), weight included
    assert members["attention_no_decay"] == sorted(
        f"blocks.{i}.se.{p}" for i in (0, 1) for p in ("fc1.bias", "fc2.weight", "fc2.bias")
    )
    assert "head.bias" in members["model_no_decay"] and "blocks.0.n1.weight" in members["model_no_decay"]
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "model": (1e-4, 0.05),
        "model_no_decay": (1e-4, 0.0),
        "attention": (1e-3, 0.05),
        "attention_no_decay": (1e-3, 0.0),
    }
    assert sum(len(v) for v in members.values()) == len(list(model.parameters()))


def test_param_groups_take_only_trainable_parameters():
    model = injected("eca")
    set_trainable(model, "attention")
    (group,) = param_groups(model, lr=1e-3)
    assert group["name"] == "attention_no_decay" and len(group["params"]) == 2 and group["lr"] == 1e-3
    with pytest.raises(AttnInjectError, match="need lr > 0"):
        param_groups(model, lr=0)


def test_trainable_summary_counts_exactly():
    model = injected("eca")
    total = sum(p.numel() for p in model.parameters())
    set_trainable(model, "attention")
    assert (
        trainable_summary(model) == f"trainable params: 6 || all params: {total:,} || trainable%: {100 * 6 / total:.4f}"
    )


def test_attention_first_then_all_in_a_plain_loop():
    model = injected("eca")
    model.train()
    set_trainable(model, "all")
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2))
    schedule = AttentionFirst(model, steps=2)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".eca." not in n}
    changes = []
    for step in range(3):
        changes.append(schedule.update(step))
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1:  # two attention-only steps: the original parameters did not move (no decay either)
            assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)
            assert not torch.equal(model.blocks[0].eca.conv.weight, torch.zeros_like(model.blocks[0].eca.conv.weight))
    assert changes == [True, False, True] and schedule.phase == "all"
    assert not torch.equal(model.head.weight, frozen_before["head.weight"])


def test_a_new_head_can_train_with_the_blocks():
    model = injected("eca")
    set_trainable(model, "attention", also=["head"])
    assert trainable(model) == ["blocks.0.eca.conv.weight", "blocks.1.eca.conv.weight", "head.weight", "head.bias"]
    with pytest.raises(AttnInjectError, match="TinyNet: no module 'neck' to train with the attention blocks"):
        set_trainable(model, "attention", also=["neck"])
