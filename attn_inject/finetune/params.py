"""What trains: the injected blocks only or everything, parameter groups, and a summary.

    set_trainable(model, "attention")             # only the injected SE / ECA blocks
    opt = torch.optim.AdamW(param_groups(model, lr=1e-4, attention_lr=1e-3))
    print(trainable_summary(model))               # trainable params: 86 || all params: 25,557,118 || ...

Weight decay follows timm's rule (nothing with one dimension or less: biases, norm weights, layer
scales; plus the model's own ``no_weight_decay()`` names) and also spares the layer that feeds each
block's gate (its ``BlockSpec.gate``: SE ``fc2``, ECA ``conv``): those start at zero, the identity,
and decay would only pull them back there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..blocks import is_attention_block, spec_of
from ..errors import AttnInjectError
from ..graph.nodes import join_path

CHOICES = ("attention", "all")


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> injected block (an instance of a registered block class)."""
    return {name: module for name, module in model.named_modules() if is_attention_block(module)}


def attention_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the injected blocks' parameters."""
    return {
        join_path(prefix, name)
        for prefix, block in attention_blocks(model).items()
        for name, _ in block.named_parameters()
    }


def set_trainable(model: nn.Module, which: str, also: Iterable[str] = ()) -> None:
    """``"attention"``: only the injected blocks' parameters require grad; ``"all"``: every parameter.

    ``also``: module paths that train with the blocks (e.g. a new head, ``"classifier"``), like PEFT's
    ``modules_to_save``.
    """
    if which not in CHOICES:
        raise AttnInjectError(f"unknown trainable set {which!r}", hint=f"Use one of: {', '.join(CHOICES)}.")
    if which == "all":
        for param in model.parameters():
            param.requires_grad_(True)
        return
    attention = attention_parameter_names(model)
    if not attention:
        raise AttnInjectError(
            f"{type(model).__name__} has no injected attention blocks with parameters",
            hint='Inject blocks first (attn_inject.inject), or train with "all".',
        )
    extra = set()
    for path in also:
        try:
            extra |= {f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()}
        except AttributeError:
            raise AttnInjectError(
                f"no module {path!r} to train with the attention blocks", where=type(model).__name__
            ) from None
    for name, param in model.named_parameters():
        param.requires_grad_(name in attention or name in extra)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters trained without weight decay: 0-/1-d tensors, the model's own list, the gates' layers."""
    model_list = getattr(model, "no_weight_decay", None)
    own = set(model_list()) if callable(model_list) else set()
    names = {name for name, param in model.named_parameters() if param.ndim <= 1 or name in own}
    for path, block in attention_blocks(model).items():
        spec = spec_of(block)
        names |= {join_path(path, name) for name in (spec.gate_parameters(block) if spec else ())}
    return names


def param_groups(
    model: nn.Module, lr: float, attention_lr: float | None = None, weight_decay: float = 0.05
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for the parameters that require grad.

    Up to four groups: (injected blocks | the rest) x (with | without weight decay). The injected
    blocks use ``attention_lr`` (default ``lr``). Each group has a ``name`` key (torch optimizers
    and timm schedulers keep extra keys); empty groups are left out.
    """
    if lr <= 0 or (attention_lr is not None and attention_lr <= 0) or weight_decay < 0:
        raise AttnInjectError(
            f"need lr > 0, attention_lr > 0 and weight_decay >= 0; got lr={lr}, attention_lr={attention_lr}, "
            f"weight_decay={weight_decay}"
        )
    attention = attention_parameter_names(model)
    no_decay = no_weight_decay_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name in attention, name not in no_decay), []).append(param)
    order = [(False, True), (False, False), (True, True), (True, False)]
    return [
        {
            "name": f"{'attention' if is_attention else 'model'}{'' if decays else '_no_decay'}",
            "params": groups[key],
            "lr": attention_lr if is_attention and attention_lr is not None else lr,
            "weight_decay": weight_decay if decays else 0.0,
        }
        for key in order
        if key in groups
        for is_attention, decays in [key]
    ]


class AttentionFirst:
    """Train only the injected blocks for the first ``steps`` optimizer steps, then everything.

    Build the optimizer over all parameters (``set_trainable(model, "all")`` then ``param_groups``);
    frozen parameters get no gradient, so AdamW leaves them (and their weight decay) alone. Call
    ``update(step)`` before each step; it returns True when the set of trainable parameters changed
    (a DistributedDataParallel wrapper must then be rebuilt). ``also``: as in ``set_trainable``.
    """

    def __init__(self, model: nn.Module, steps: int, also: Iterable[str] = ()):
        if steps < 0:
            raise AttnInjectError(f"attention-only steps must be >= 0, got {steps}")
        self.model = model
        self.steps = steps
        self.also = tuple(also)
        self.phase: str | None = None

    def phase_at(self, step: int) -> str:
        return "attention" if step < self.steps else "all"

    def update(self, step: int) -> bool:
        phase = self.phase_at(step)
        if phase == self.phase:
            return False
        set_trainable(self.model, phase, self.also)
        self.phase = phase
        return True


def classifier_path(model: nn.Module) -> str | None:
    """Module path of the classifier timm's ``get_classifier()`` returns, if any."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return next((name for name, module in model.named_modules() if module is head and name), None)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters count once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """PEFT's ``print_trainable_parameters`` line: trainable || all || trainable%."""
    trainable, total = count_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"
