"""Example inputs, and the exact comparison of the original and the patched model's outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import AttnInjectError

DEFAULT_INPUT_SIZE = (3, 224, 224)


def example_args(model: nn.Module, example_input: Any = None, input_size: tuple[int, ...] | None = None) -> tuple:
    """Positional arguments for the example forward.

    ``example_input`` may be a tensor or a tuple of arguments. By default: one image of
    ``input_size`` (C, H, W), else the model's configured size (timm ``pretrained_cfg["input_size"]``),
    else 3x224x224; random normal from a fixed seed, in the dtype and on the device of the model's
    parameters.
    """
    if example_input is not None:
        return example_input if isinstance(example_input, tuple) else (example_input,)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(input_size or cfg.get("input_size", DEFAULT_INPUT_SIZE))
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return (torch.randn((1, *size), generator=generator).to(device=device, dtype=dtype),)


def run(model: nn.Module, args: tuple) -> Any:
    with torch.no_grad():
        return model(*args)


def first_difference(expected: Any, actual: Any) -> str | None:
    """None if every tensor in the two outputs is bitwise equal; else a description."""
    leaves_e, spec_e = pytree.tree_flatten(expected)
    leaves_a, spec_a = pytree.tree_flatten(actual)
    if spec_e != spec_a:
        return f"the output structure changed ({spec_e} -> {spec_a})"
    for i, (e, a) in enumerate(zip(leaves_e, leaves_a)):
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor) or e.shape != a.shape or e.dtype != a.dtype:
                return f"output {i} changed type or shape"
            if not bitwise_equal(e, a):
                diff = (e.float() - a.float()).abs().nan_to_num(nan=float("inf")).max().item()
                return f"output {i} differs (max abs difference {diff:.3g})"
        elif e != a:
            return f"output {i} changed ({e!r} -> {a!r})"
    return None


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(e: torch.Tensor, a: torch.Tensor) -> bool:
    """Equal bit for bit: floats are compared as integers of the same width (so -0.0 != 0.0, NaN == NaN)."""
    if e.shape != a.shape or e.dtype != a.dtype:
        return False
    if e.is_floating_point() and e.element_size() in _SAME_WIDTH_INT:
        int_type = _SAME_WIDTH_INT[e.element_size()]
        return torch.equal(e.contiguous().view(int_type), a.contiguous().view(int_type))
    return torch.equal(e, a)


def check_identical(expected: Any, actual: Any, what: str) -> None:
    problem = first_difference(expected, actual)
    if problem:
        raise AttnInjectError(
            f"{what}: {problem}; the model was left unchanged",
            hint="This is a bug in attn_inject: please report it with the model. Pass verify=False to skip the check.",
        )
