"""Testing helpers: weights that look trained, so bitwise-identity checks can fail, and checks that
every injected block runs and matters (used by the tests and benchmarks; public for your own models).

Freshly initialised models hide a block placed at a branch end: timm zero-initialises the last norm
of each residual branch (``zero_init_last``), ConvNeXt-style layer scales start at 1e-6, NFNet's
skip gains at 0, and fresh running statistics (mean 0, variance 1) make an eval-mode BatchNorm a
plain affine. Whatever a block computes there, the output does not change. ``look_trained`` undoes
that; ``block_calls`` and ``move_off_identity`` check, after an inject, that every block runs and
that the blocks matter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .finetune.params import attention_blocks

TINY = 1e-3  # a parameter whose elements all equal one value this small is a zero or layer-scale init


def _is_norm(module: nn.Module) -> bool:
    """torch's norms and the many custom ones (timm LayerNorm2d, torchvision FrozenBatchNorm2d,
    HF ConvNextLayerNorm)."""
    return "Norm" in type(module).__name__


def look_trained(model: nn.Module, *example: Any, seed: int = 0) -> nn.Module:
    """Give ``model`` weights that look trained, in place; returns it in eval mode.

    Random norm affines and statistics, layer scales about 0.5 (``randomize_untrained``); with
    ``example`` arguments, the BatchNorm statistics are then measured on them
    (``calibrate_batch_norms``), so that activations keep their scale where the init does not
    (Hugging Face initialises convs with std 0.02: a fresh MobileViT's output is the same for
    every input).
    """
    randomize_untrained(model, seed)
    if example:
        calibrate_batch_norms(model, *example)
    return model.eval()


@torch.no_grad()
def randomize_untrained(model: nn.Module, seed: int = 0) -> None:
    """Replace the values that only an untrained model has, in place:

    * every norm (any class whose name contains ``Norm``, parameters or buffers): weight U(0.5, 1.5),
      bias N(0, 0.1), running mean N(0, 0.1), running variance U(0.5, 1.5);
    * every other parameter whose elements all equal one tiny value (|v| <= 1e-3: zero inits, layer
      scales such as timm's ``gamma``/``ls1``/``layer_scale``, NFNet's ``skipinit_gain``, HF's
      ``layer_scale_parameter``): weights with two or more dims N(0, 1/fan_in), biases N(0, 0.1),
      the rest (layer scales, gains) U(0.25, 0.75), about 0.5.
    """
    g = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor, how: str) -> None:
        shape = t.shape
        if how == "weight":
            value = torch.rand(shape, generator=g) + 0.5
        elif how == "scale":
            value = torch.rand(shape, generator=g) * 0.5 + 0.25
        elif how == "variance":
            value = torch.rand(shape, generator=g) + 0.5
        elif how == "fan_in":
            value = torch.randn(shape, generator=g) / max(1, t[0].numel()) ** 0.5
        else:  # "bias", "mean"
            value = torch.randn(shape, generator=g) * 0.1
        t.copy_(value.to(t.dtype))

    norm_tensors: set[int] = set()
    for module in model.modules():
        if not _is_norm(module):
            continue
        for name, how in (
            ("weight", "weight"),
            ("bias", "bias"),
            ("running_mean", "mean"),
            ("running_var", "variance"),
        ):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                fill(t, how)
                norm_tensors.add(id(t))
    for name, p in model.named_parameters():
        if id(p) in norm_tensors or not p.is_floating_point() or not p.numel():
            continue
        first = p.reshape(-1)[0]
        if first.abs() <= TINY and bool((p == first).all()):
            fill(p, "fan_in" if p.dim() >= 2 else "bias" if name.endswith("bias") else "scale")


@torch.no_grad()
def calibrate_batch_norms(model: nn.Module, *args: Any) -> bool:
    """Set every BatchNorm's running statistics to those of one forward on ``args`` (the norms run
    in train mode, everything else in eval). False, with the statistics as they were, if that
    forward fails."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms}  # type: ignore[union-attr]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one forward sets the statistics
        m.train()
    ok = True
    try:
        model(*args)
    except Exception:
        ok = False
        for m, (_, mean, var) in saved.items():
            m.running_mean.copy_(mean)  # type: ignore[union-attr]
            m.running_var.copy_(var)  # type: ignore[union-attr]
    for m, (momentum, _, _) in saved.items():
        m.momentum = momentum
    model.eval()
    return ok


@contextlib.contextmanager
def counting_block_calls(model: nn.Module) -> Iterator[dict[nn.Module, int]]:
    """Count the calls of every injected block while the context is open."""
    calls = dict.fromkeys(attention_blocks(model).values(), 0)

    def count(module: nn.Module, args: Any, out: Any) -> None:
        calls[module] += 1

    handles = [block.register_forward_hook(count) for block in calls]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def blocks_not_run(model: nn.Module, *args: Any) -> int:
    """How many injected blocks a no_grad forward on ``args`` never calls."""
    with counting_block_calls(model) as calls, torch.no_grad():
        model(*args)
    return sum(1 for n in calls.values() if n == 0)


@torch.no_grad()
def move_off_identity(model: nn.Module, seed: int = 1) -> int:
    """Add N(0, 0.5) noise to every parameter of every injected block; returns how many blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks = list(attention_blocks(model).values())
    for block in blocks:
        for p in block.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.5).to(p.dtype))
    return len(blocks)
