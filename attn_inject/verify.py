"""Example inputs, and the exact comparison of the original and the patched model's outputs."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import AttnInjectError

DEFAULT_INPUT_SIZE = (3, 224, 224)
MAX_SIDE = 4096  # an example image larger than this would need tens of GB of activations in a CNN


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
    if not all(type(s) is int and 0 < s <= MAX_SIDE for s in size):
        raise AttnInjectError(
            f"input size {size} is not a (channels, height, width) of positive ints up to {MAX_SIDE}",
            hint="Pass a smaller size, or example_input= with a tensor the model accepts.",
        )
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return (torch.randn((1, *size), generator=generator).to(device=device, dtype=dtype),)


def run(model: nn.Module, args: tuple) -> Any:
    """One forward under no_grad, from a fixed random state (so forwards that draw random numbers
    give the same output before and after injection); the caller's random state is kept."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return model(*args)


def example_forward_failed(model: nn.Module, exc: Exception) -> AttnInjectError:
    """The error for a model that fails on the example input."""
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return AttnInjectError(
        f"the example forward of {type(model).__name__} failed: {type(exc).__name__}: {first_line}",
        hint="Pass example_input= (a tensor or tuple of arguments) that the model accepts.",
    )


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


def mismatch_error(what: str, problem: str, rerun_original: Callable[[], Any], expected: Any,
                   blocks: dict[str, nn.Module], example: dict[str, torch.Tensor]) -> AttnInjectError:
    """Why the patched model's output differed, told apart: the original model is not
    deterministic (it differs from itself), a block is not the identity when built, or a bug here."""
    base = f"{what}: {problem}; the model was left unchanged"
    again = first_difference(expected, rerun_original())
    if again:
        return AttnInjectError(
            f"{base}. The original model itself gives different outputs on the same input ({again}), so "
            "its outputs cannot be compared",
            hint="Make its forward deterministic for the check (eval mode, no randomness), or pass verify=False.",
        )
    for name, block in blocks.items():
        x = example[name]
        with torch.no_grad():
            y = block(x.clone())
        if not (isinstance(y, torch.Tensor) and bitwise_equal(x, y)):
            return AttnInjectError(
                f"{base}. Block {name} ({type(block).__name__}) does not return its input unchanged when built",
                hint="A block built with init='identity' must be the identity (see attn_inject.blocks.registry); "
                "pass verify=False to inject it anyway.",
            )
    return AttnInjectError(
        base, hint="This is a bug in attn_inject: please report it with the model. Pass verify=False to skip the check."
    )
