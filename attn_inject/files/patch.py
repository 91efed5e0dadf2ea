"""Patching a checkpoint file: read it safely, inject, write .safetensors with the recipe, verify.

This is what ``attn-inject patch`` and the demo run. Every check on the arguments and the output
path runs before any work; the output is written to a temporary file next to it and only renamed
into place once verification passed, so a failed run leaves nothing behind.

Verification (``verify=``):

- ``"fast"`` (the default) reads the written file back and checks that its recipe is the patched
  model's, that it holds exactly the patched model's tensors (names, dtypes, shapes) bit for bit,
  and runs the patched model on the example input: the output must equal the original model's bit
  for bit (eval mode, the checkpoint's model in fp32). It does not rebuild the model from the file:
  that the recipe rebuilds the same model is what ``load`` checks (each injection must land on the
  recorded blocks) and what the tests check for every architecture kind.
- ``"full"`` also rebuilds the model from the written file with ``load`` (``apply_adapter`` for an
  adapter) and runs that: slower (a second model build and analysis).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import AttnInjectError
from ..graph.example import bitwise_equal, example_args, first_difference, run
from ..surgery.api import inject
from ..surgery.recipe import injected_key, patched_recipe_of
from .adapters import apply_adapter
from .checkpoints import fit_state_dict, load_pretrained, model_holding, read_state_dict
from .format import file_header
from .output import check_safetensors_output
from .saving import load, write_patched

VERIFY_MODES = ("fast", "full")


@dataclass
class PatchReport:
    """What ``patch_checkpoint`` did, for the CLI summary and ``--json``."""

    source: Path
    output: Path
    arch: str
    block: str
    rules: list[str]
    sites: list[str]
    params_before: int
    params_after: int
    keys_mapped: bool
    verified: str
    bytes: int
    adapter_only: bool
    example_input: list[list[int]]
    seconds: dict[str, float] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "input": str(self.source),
            "output": str(self.output),
            "arch": self.arch,
            "block": self.block,
            "rules": self.rules,
            "sites": self.sites,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_added": self.params_after - self.params_before,
            "keys_mapped_by_order": self.keys_mapped,
            "verified": self.verified,
            "bytes": self.bytes,
            "adapter_only": self.adapter_only,
            "example_input": self.example_input,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }


def patch_checkpoint(
    source: str | os.PathLike,
    arch: str,
    block: str,
    after: Any,
    output: str | os.PathLike,
    *,
    num_classes: int | None = None,
    include: str | Iterable[str] = (),
    exclude: str | Iterable[str] = (),
    position: str | None = None,
    img_size: int | None = None,
    input_size: tuple[int, ...] | None = None,
    options: dict[str, Any] | None = None,
    force: bool = False,
    adapter_only: bool = False,
    verify: str = "fast",
    stack: bool = False,
) -> PatchReport:
    """Patch the plain checkpoint ``source`` (a model of ``arch``) and write ``output`` (.safetensors).
    The example input is a square image of ``img_size``, or of ``input_size`` (C, L), (C, H, W) or
    (C, D, H, W) for 1-D and 3-D models; by default the model's own size."""
    clock = _Clock()
    if verify not in VERIFY_MODES:
        raise AttnInjectError(f"unknown verify mode {verify!r}", hint=f"Use one of: {', '.join(VERIFY_MODES)}.")
    out = check_safetensors_output(output, inputs=[source], force=force)
    state = read_state_dict(source)
    clock.lap("read")
    mapped = []

    def weights_for(model: nn.Module) -> dict[str, torch.Tensor]:
        fitted, was_mapped = fit_state_dict(model, state, str(source))
        mapped.append(was_mapped)
        return fitted

    model = model_holding(arch, num_classes, weights_for)
    clock.lap("build")
    args = example_args(model, input_size=(3, img_size, img_size) if img_size is not None else input_size)
    params_before = sum(p.numel() for p in model.parameters())
    reference = run(model, args)
    clock.lap("reference_forward")
    inject(
        model,
        block,
        after,
        include=include,
        exclude=exclude,
        position=position,
        example_input=args,
        verify=False,
        stack=stack,
        **(options or {}),
    )
    model.eval()
    clock.lap("inject")

    def check(tmp: Path) -> None:
        clock.lap("write")
        _check_written(tmp, model, adapter_only, reference, args)
        clock.lap("verify")
        if verify == "full":
            _check_rebuilt(tmp, source, arch, num_classes, adapter_only, reference, args)
            clock.lap("verify_full")

    write_patched(model, out, force=force, adapter_only=adapter_only, check=check)
    recipe = patched_recipe_of(model)
    return PatchReport(
        Path(source),
        out,
        arch,
        block,
        [r.name for r in recipe.injections[-1].rules],
        list(recipe.injections[-1].modules),
        params_before,
        sum(p.numel() for p in model.parameters()),
        any(mapped),
        verify,
        out.stat().st_size,
        adapter_only,
        [list(a.shape) for a in args if isinstance(a, torch.Tensor)],
        clock.laps,
        model,
    )


def _check_written(path: Path, model: nn.Module, adapter_only: bool, reference: Any, args: tuple) -> None:
    """The file holds the patched model's recipe and tensors bit for bit; the model's output is the original's."""
    header = file_header(path)
    if header.recipe is None or header.recipe.to_json() != patched_recipe_of(model).to_json():
        raise AttnInjectError("the written recipe does not read back as the model's", where=str(path))
    written = load_file(str(path))
    expected = model.state_dict()
    if adapter_only:
        modules = set(patched_recipe_of(model).modules)
        expected = {k: v for k, v in expected.items() if injected_key(k, modules)}
    if set(written) != set(expected):
        raise AttnInjectError("the written file does not hold the patched model's tensors", where=str(path))
    for key, value in expected.items():
        if not _bitwise(written[key], value):
            raise AttnInjectError(f"tensor {key} does not read back bit for bit", where=str(path))
    _same_output(reference, run(model, args), "the patched model")


def _check_rebuilt(
    path: Path,
    source: str | os.PathLike,
    arch: str,
    num_classes: int | None,
    adapter_only: bool,
    reference: Any,
    args: tuple,
) -> None:
    if adapter_only:
        rebuilt = apply_adapter(load_pretrained(source, arch, num_classes=num_classes), path)
    else:
        rebuilt = load(path, arch, num_classes=num_classes)
    _same_output(reference, run(rebuilt.eval(), args), "the model rebuilt from the written file")


def _same_output(reference: Any, actual: Any, what: str) -> None:
    problem = first_difference(reference, actual)
    if problem:
        raise AttnInjectError(
            f"{what} does not compute the original's outputs: {problem}; nothing was written",
            hint="This is a bug in attn_inject: please report it with the model and arguments.",
        )


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bitwise_equal(a, b.detach().cpu())


class _Clock:
    """Seconds spent in each phase (the benchmark reports them)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
