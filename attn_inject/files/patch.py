"""Patching a checkpoint file: read it safely, inject, write .safetensors with the recipe, verify.

This is what ``attn-inject patch`` and the demo run. Every check on the arguments and the output
path runs before any work; the output is written to a temporary file next to it and only renamed
into place once verification passed, so a failed run leaves nothing behind. The output format is a
``PatchWriter``: .safetensors here (``SAFETENSORS``); the ultralytics integration adds its .pt, and
reads its input itself (``patch_state`` takes the tensors).

Verification (``verify=``):

- ``"fast"`` (the default): ``inject`` verifies that the patched model's output on the example input
  equals the original model's bit for bit (eval mode, the checkpoint's model in fp32; its reference
  forward leaves the model as it was), before anything is written; the written file is read back:
  its recipe must be the patched model's and it must hold exactly the patched model's tensors
  (names, dtypes, shapes) bit for bit. It does not rebuild the model from the file:
  that the recipe rebuilds the same model is what ``load`` checks (each injection must land on the
  recorded blocks) and what the tests check for every architecture kind.
- ``"full"`` also rebuilds the model from the written file with ``load`` (``apply_adapter`` for an
  adapter) and runs that: slower (a second model build and analysis).
- ``"none"`` injects without verification (the file is still read back tensor by tensor): for blocks
  that are not the identity by design (``init="paper"``), which the other modes refuse up front.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import AttnInjectError
from ..graph.example import (
    bitwise_equal,
    configured_input_size,
    example_args,
    example_shapes_problem,
    first_difference,
    run,
)
from ..surgery.api import inject
from ..surgery.frameworks import library_call
from ..surgery.recipe import injected_key, patched_recipe_of
from .adapters import apply_adapter
from .checkpoints import fit_state_dict, load_pretrained, model_holding, plain_header, read_state_dict
from .format import file_header
from .output import check_safetensors_output
from .saving import load, saved_recipe, write_patched

VERIFY_MODES = ("fast", "full", "none")


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


@dataclass(frozen=True)
class PatchSettings:
    """What ``patch`` does besides the block and rules: the ``inject`` arguments and how to write."""

    num_classes: int | None = None
    include: str | Iterable[str] = ()
    exclude: str | Iterable[str] = ()
    position: str | None = None
    img_size: int | None = None  # a square RGB image of this side
    input_size: tuple[int, ...] | None = None  # or (C, L), (C, H, W), (C, D, H, W)
    options: dict[str, Any] | None = None
    force: bool = False
    adapter_only: bool = False
    verify: str = "fast"
    stack: bool = False

    def __post_init__(self) -> None:
        if self.img_size is not None and self.input_size is not None:
            raise AttnInjectError(
                "give img_size or input_size, not both",
                hint=f"input_size=(3, {self.img_size}, {self.img_size}) is img_size={self.img_size}.",
                field="input_size",
            )
        if self.verify not in VERIFY_MODES:
            raise AttnInjectError(
                f"unknown verify mode {self.verify!r}", hint=f"Use one of: {', '.join(VERIFY_MODES)}."
            )
        init = (self.options or {}).get("init", "identity")
        if init != "identity" and self.verify != "none":
            raise AttnInjectError(
                f"init={init} is not the identity by design: the patched model's outputs differ from the "
                f"original's, which verify={self.verify} checks",
                hint="Pass verify=none to write it (the file is still read back, tensor by tensor).",
                field="verify",
            )


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
    settings = PatchSettings(
        num_classes=num_classes,
        include=include,
        exclude=exclude,
        position=position,
        img_size=img_size,
        input_size=input_size,
        options=options,
        force=force,
        adapter_only=adapter_only,
        verify=verify,
        stack=stack,
    )
    clock = PhaseClock()
    out = check_safetensors_output(output, inputs=[source], force=settings.force)
    plain_header(source)  # a file already patched is refused
    state = read_state_dict(source)
    clock.lap("read")
    return patch_state(state, source, arch, block, after, out, SAFETENSORS, settings, clock)


class PatchWriter(Protocol):
    """An output format of ``patch``: how the patched model is written and read back for the check."""

    def write(
        self, model: nn.Module, out: Path, force: bool, adapter_only: bool, check: Callable[[Path], None]
    ) -> None: ...  # writes atomically; check(tmp) runs on the written temporary file

    def read_back(self, path: Path) -> tuple[str | None, dict[str, torch.Tensor]]: ...  # recipe JSON, tensors

    def expected(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...  # what it writes of these

    def rebuild(self, path: Path, arch: str, num_classes: int | None) -> nn.Module: ...  # what a user gets back


class _Safetensors:
    def write(
        self, model: nn.Module, out: Path, force: bool, adapter_only: bool, check: Callable[[Path], None]
    ) -> None:
        write_patched(model, out, force=force, adapter_only=adapter_only, check=check)

    def read_back(self, path: Path) -> tuple[str | None, dict[str, torch.Tensor]]:
        header = file_header(path)
        return None if header.recipe is None else header.recipe.to_json(), load_file(str(path))

    def expected(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def rebuild(self, path: Path, arch: str, num_classes: int | None) -> nn.Module:
        return load(path, arch, num_classes=num_classes)


SAFETENSORS: PatchWriter = _Safetensors()


def patch_state(
    state: dict[str, torch.Tensor],
    source: str | os.PathLike,
    arch: str,
    block: str,
    after: Any,
    out: Path,
    writer: PatchWriter,
    settings: PatchSettings,
    clock: PhaseClock | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
) -> PatchReport:
    """``patch_checkpoint`` from the tensors ``state`` read from ``source``, written by ``writer`` to
    ``out`` (checked already); ``prepare(model)`` runs on the built model before the injection."""
    clock = clock or PhaseClock()
    num_classes, img_size, adapter_only, verify = (
        settings.num_classes,
        settings.img_size,
        settings.adapter_only,
        settings.verify,
    )
    mapped = []

    def weights_for(model: nn.Module) -> dict[str, torch.Tensor]:
        fitted, was_mapped = fit_state_dict(model, state, str(source))
        mapped.append(was_mapped)
        return fitted

    model = model_holding(arch, num_classes, weights_for)
    if prepare is not None:
        prepare(model)
    clock.lap("build")
    size = (3, img_size, img_size) if img_size is not None else settings.input_size
    args = example_args(model, input_size=size)
    problem = example_shapes_problem([tuple(a.shape) for a in args], configured_input_size(model))
    if problem:
        flag = "--img-size" if img_size is not None else "--input-size"
        raise AttnInjectError(
            f"{flag} {img_size if img_size is not None else ','.join(map(str, size or ()))} gives {problem}; "
            "load() refuses files that ask for more",
            hint=f"Use a smaller {flag} (up to twice the model's configured side).",
        )
    params_before = sum(p.numel() for p in model.parameters())
    with library_call():  # verified: the patched model's outputs are the original's (reference and check)
        inject(
            model,
            block,
            after,
            include=settings.include,
            exclude=settings.exclude,
            position=settings.position,
            example_input=args,
            verify=verify != "none",
            stack=settings.stack,
            **(settings.options or {}),
        )
    model.eval()
    clock.lap("inject")

    def check(tmp: Path) -> None:
        clock.lap("write")
        _check_written(tmp, writer, model, adapter_only)
        clock.lap("verify")
        if verify == "full":  # the patched model computes the original's outputs (inject verified it)
            _check_rebuilt(tmp, writer, source, arch, num_classes, adapter_only, run(model, args), args)
            clock.lap("verify_full")

    writer.write(model, out, settings.force, adapter_only, check)
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


def _check_written(path: Path, writer: PatchWriter, model: nn.Module, adapter_only: bool) -> None:
    """The file holds the patched model's recipe and tensors bit for bit."""
    recipe, written = writer.read_back(path)
    if recipe is None or recipe != saved_recipe(model).to_json():
        raise AttnInjectError("the written recipe does not read back as the model's", where=str(path))
    expected = writer.expected(model.state_dict())
    if adapter_only:
        modules = set(patched_recipe_of(model).modules)
        expected = {k: v for k, v in expected.items() if injected_key(k, modules)}
    if set(written) != set(expected):
        raise AttnInjectError("the written file does not hold the patched model's tensors", where=str(path))
    for key, value in expected.items():
        if not _bitwise(written[key], value):
            raise AttnInjectError(f"tensor {key} does not read back bit for bit", where=str(path))


def _check_rebuilt(
    path: Path,
    writer: PatchWriter,
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
        rebuilt = writer.rebuild(path, arch, num_classes)
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


class PhaseClock:
    """Seconds spent in each phase (the benchmark reports them)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
