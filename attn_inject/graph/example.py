"""The example forward's inputs and how its outputs are compared: seeded tensors, one no-grad run,
bit-for-bit equality."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import AttnInjectError, one_line

DEFAULT_INPUT_SIZE = (3, 224, 224)
MAX_SIDE = 4096  # an example image larger than this would need tens of GB of activations in a CNN
# What a recorded example input (a recipe's input_shapes) may ask for: at most what plan() allows (one
# 3 x MAX_SIDE x MAX_SIDE image), in a few small tensors, and, when the model has a configured input
# size, at most EXAMPLE_SCALE times the values of one image of that size (2x the side, or 4 images).
MAX_EXAMPLE_VALUES = 3 * MAX_SIDE * MAX_SIDE
MAX_EXAMPLE_TENSORS = 8
MAX_EXAMPLE_DIMS = 8
EXAMPLE_SCALE = 4


def parameter_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype (float32 unless the parameters are floating point) and device of the model's parameters."""
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    return dtype, device


def seeded_tensors(
    shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Standard normal tensors of ``shapes``, drawn in order from one generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for shape in shapes)


def example_args(
    model: nn.Module, example_input: Any = None, input_size: tuple[int, ...] | None = None, keywords: bool = False
) -> tuple:
    """Positional arguments for the example forward.

    ``example_input`` may be a tensor or a tuple of arguments. By default: one image of
    ``input_size`` (C, H, W; or (C, L), (C, D, H, W) for 1-D and 3-D models), else the model's
    configured size (timm ``pretrained_cfg["input_size"]``),
    else 3x224x224; random normal from a fixed seed, in the dtype and on the device of the model's
    parameters. With ``keywords`` (the example is given as keyword arguments) there is no default.
    """
    if example_input is not None:
        return example_input if isinstance(example_input, tuple) else (example_input,)
    if keywords:
        return ()
    size = tuple(input_size or configured_input_size(model) or DEFAULT_INPUT_SIZE)
    if not (2 <= len(size) <= 4 and all(type(s) is int and 0 < s <= MAX_SIDE for s in size)):
        raise AttnInjectError(
            f"input size {size} is not a (channels, height, width) of positive ints up to {MAX_SIDE} "
            "(1-D and 3-D models: (channels, length), (channels, depth, height, width))",
            hint="Pass a smaller size, or example_input= with a tensor the model accepts.",
        )
    return seeded_tensors([(1, *size)], *parameter_dtype_device(model))


def configured_input_size(model: nn.Module) -> tuple | None:
    """The input size the model says it takes (timm ``pretrained_cfg["input_size"]``), or None."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if isinstance(size, (tuple, list)) else None


def example_shapes_problem(shapes: Sequence[Sequence[int]], configured: tuple | None = None) -> str | None:
    """Why a recorded example input is larger than a file may ask for (None when it is not).

    ``configured``: the model's configured input size (C, H, W), when known.
    """
    if len(shapes) > MAX_EXAMPLE_TENSORS:
        return f"{len(shapes)} example tensors, more than {MAX_EXAMPLE_TENSORS}"
    for shape in shapes:
        if not (0 < len(shape) <= MAX_EXAMPLE_DIMS and all(type(n) is int and 0 < n <= MAX_SIDE for n in shape)):
            shown = list(shape)[: MAX_EXAMPLE_DIMS + 1]
            return f"the shape {shown} is not {MAX_EXAMPLE_DIMS} or fewer sizes up to {MAX_SIDE}"
    values = sum(math.prod(shape) for shape in shapes)
    if values > MAX_EXAMPLE_VALUES:
        return f"{values:,} example values, more than the {MAX_EXAMPLE_VALUES:,} of one 3x{MAX_SIDE}x{MAX_SIDE} image"
    if configured and all(type(n) is int and n > 0 for n in configured):
        one = math.prod(configured)
        if values > EXAMPLE_SCALE * one:
            return (
                f"{values:,} example values, more than {EXAMPLE_SCALE}x the {one:,} of one image of the model's "
                f"configured input size {tuple(configured)}"
            )
    return None


def example_kwargs(value: Any) -> dict[str, Any]:
    """The keyword arguments of the example forward: a mapping with string keys (a dict, or a
    processor's output such as transformers' ``BatchFeature``), as a plain dict."""
    if value is None:
        return {}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return dict(value.items())
    raise AttnInjectError(
        f"example_kwargs= must be a mapping of argument names to values, not {type(value).__name__}",
        hint="For example example_kwargs=dict(pixel_values=x), or a processor's output (a BatchFeature).",
    )


def run(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> Any:
    """One forward under no_grad, from a fixed random state (so forwards that draw random numbers
    give the same output before and after injection); the caller's random state is kept."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return model(*args, **(kwargs or {}))


def example_forward_failed(model: nn.Module, exc: Exception, args: tuple = ()) -> AttnInjectError:
    """The error for a model that fails on the example input (``args``: its positional arguments)."""
    hint = "Pass example_input= (a tensor or tuple of arguments) that the model accepts."
    if any(isinstance(a, Mapping) for a in args):
        hint = (
            "example_input= is passed as positional arguments, a dict too; pass a dict of keyword arguments "
            "(a processor's output) as example_kwargs= instead."
        )
    elif any(isinstance(m, (nn.Conv1d, nn.Conv3d)) for m in model.modules()):
        hint += (
            " A model of 1-D or 3-D convs takes an input of its own shape, (1, C, L) or (1, C, D, H, W); "
            "on the command line: --input-size C,L or C,D,H,W."
        )
    return AttnInjectError(f"the example forward of {type(model).__name__} failed: {one_line(exc)}", hint=hint)


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
