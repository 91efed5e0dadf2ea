"""Plain checkpoints: reading weights safely, fitting a state_dict from another implementation by
order and shape, and building an architecture that holds them (``load_pretrained``).

A checkpoint is read with timm's ``load_state_dict`` (``torch.load(weights_only=True)`` for
.pth/.pt/.bin, safetensors for .safetensors; it unwraps ``state_dict``/``model``/``state_dict_ema``
and strips ``module.``/``_orig_mod.`` prefixes), so no pickled code is ever run.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from timm.models import load_state_dict, remap_state_dict
from torch import nn

from ..errors import AttnInjectError, one_line
from ..safe_read import check_unpacks_within, open_regular
from .arch import BuildFailed, create_model
from .data_config import remember_data
from .format import Header, file_header
from .pickle_scan import scan_checkpoint

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file; anything else (code, a whole pickled model) is refused."""
    path = Path(path)
    if path.is_dir():
        raise AttnInjectError(
            "a folder, not a checkpoint file", where=str(path), hint="Give the path of a weights file."
        )
    if not path.exists():
        raise AttnInjectError("no such checkpoint file", where=str(path), hint="Check the path.")
    open_regular(path, "the checkpoint").close()  # a device or a FIFO is refused before anything reads it
    if path.stat().st_size == 0:
        raise AttnInjectError(
            "the checkpoint file is empty", where=str(path), hint="The file was not written completely; get it again."
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise AttnInjectError(
            f"unsupported checkpoint type {path.suffix or '(no suffix)'}",
            where=str(path),
            hint=f"Use one of: {', '.join(WEIGHT_SUFFIXES)}.",
        )
    if path.suffix != ".safetensors":
        check_unpacks_within(path, "the checkpoint")  # torch unpacks the whole archive
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's business
            warnings.simplefilter("ignore", UserWarning)
            state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as exc:  # a damaged or foreign file: torch, zipfile and safetensors raise many kinds
        raise _unreadable(path, exc) from None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise AttnInjectError("the checkpoint holds no tensors", where=str(path))
    return tensors


def _unreadable(path: Path, exc: Exception) -> AttnInjectError:
    """Why a checkpoint could not be read safely, in words: code, a pickle format, or damage.

    torch's and timm's own messages advise retrying with ``weights_only=False`` (which would run any
    code in the file): they are never quoted.
    """
    damaged = "The file is truncated or damaged, or not a PyTorch state_dict; get it again."
    if path.suffix == ".safetensors":
        return AttnInjectError(f"not a valid .safetensors file ({one_line(exc)})", where=str(path), hint=damaged)
    scan = scan_checkpoint(path)
    code = scan.code() if scan is not None else []
    if code:
        return AttnInjectError(
            f"this file holds code; attn_inject never runs it (the pickle calls {', '.join(code[:3])})",
            where=str(path),
            hint="Save model.state_dict() (tensors only) with torch.save or as .safetensors, and pass that file.",
        )
    advice = "weights_only" in str(exc)  # torch's or timm's words, which end in unsafe advice
    if scan is None or not advice:
        reason = "neither a PyTorch zip archive nor a pickle" if advice else one_line(exc)
        return AttnInjectError(
            f"not a valid checkpoint: torch.load cannot parse it ({reason})", where=str(path), hint=damaged
        )
    if scan.protocol > 2:
        return AttnInjectError(
            f"not a checkpoint torch reads safely: a protocol-{scan.protocol} pickle, which "
            "torch.load(weights_only=True) does not parse",
            where=str(path),
            hint="Save it again with torch.save(state_dict, path) (protocol 2, its default) or as .safetensors.",
        )
    return AttnInjectError(
        "not a checkpoint torch reads safely: torch.load(weights_only=True) refused its pickle",
        where=str(path),
        hint="Save model.state_dict() (tensors only) with torch.save or as .safetensors, and pass that file.",
    )


def fit_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], bool]:
    """``state`` keyed for ``model``; True in the result when keys were mapped by order and shape.

    Keys that already match (every key and shape) are used as they are. Otherwise, when both hold
    the same number of tensors and every shape agrees in order (weights of another implementation
    of the same architecture), keys are mapped by position with timm's ``remap_state_dict``.
    """
    target = model.state_dict()
    if set(state) == set(target) and all(state[k].shape == target[k].shape for k in target):
        return state, False
    problem = _first_mismatch(target, state)
    if problem is None and source.endswith(".safetensors"):
        problem = "the keys differ and a .safetensors file does not keep the tensors' original order"
    if problem is not None:
        raise AttnInjectError(
            f"the checkpoint does not fit {type(model).__name__}: {problem}",
            where=source,
            hint="Check --arch (and --num-classes if the head differs).",
        )
    log.warning(
        "%s: keys differ from %s; mapped all %d tensors by order and shape", source, type(model).__name__, len(state)
    )
    return remap_state_dict(state, model, allow_reshape=False), True


def _first_mismatch(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` cannot be mapped onto ``target`` by position, or None if it can."""
    if len(state) != len(target):
        missing = [k for k in target if k not in state][:3]
        return f"{len(state)} tensors for {len(target)} (missing e.g. {missing})"
    for (key, want), (theirs, got) in zip(target.items(), state.items()):
        if want.shape != got.shape:
            return f"{theirs} has shape {list(got.shape)} where {key} needs {list(want.shape)}"
    return None


def load_pretrained(
    path: str | os.PathLike, arch: str, *, num_classes: int | None = None, model_options: dict[str, Any] | None = None
) -> nn.Module:
    """A plain (unpatched) checkpoint as a model: build ``arch``, read ``path`` safely, map keys by
    order and shape where needed (with a warning), load strictly; returned in eval mode. A plain
    model saved by ``save`` brings its data config and class names (``remember_data``)."""
    header = plain_header(path)
    state = read_state_dict(path)
    model = model_holding(arch, num_classes, lambda model: fit_state_dict(model, state, str(path))[0], model_options)
    if header is not None:
        remember_data(model, header.data)
    return model


def model_holding(
    arch: str, num_classes: int | None, weights_for, model_options: dict[str, Any] | None = None
) -> nn.Module:
    """``arch`` built and loaded strictly with ``weights_for(model)`` (which checks the keys), in eval mode.
    ``model_options``: further factory arguments (``create_model``).

    timm and torchvision models are built on the meta device and take the checkpoint's tensors
    (cast to the model's dtypes, copied where misaligned) instead of initialising weights that would
    be overwritten, which is as fast as reading them; if that
    leaves anything on the meta device (a non-persistent buffer) or fails, the model is built normally.
    """
    if ":" not in arch or arch.startswith("torchvision:"):
        model = _built_on_meta(arch, num_classes, model_options)
        if model is not None:
            target = model.state_dict()
            state = weights_for(model)
            model.load_state_dict({k: _like(v, target[k]) for k, v in state.items()}, assign=True)
            if not _meta_left(model):
                return model.eval()
    model = create_model(arch, num_classes, model_options)
    state = weights_for(model)
    model.load_state_dict(state)
    return model.eval()


def _built_on_meta(arch: str, num_classes: int | None, options: dict[str, Any] | None) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return create_model(arch, num_classes, options)
    except BuildFailed:  # code that needs real tensors at construction: build normally
        return None


def _like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` as the model's own tensor would hold it: ``target``'s dtype and strides, aligned.

    CPU kernels take other paths, whose results differ in the last bits, for weights in another
    memory layout (a checkpoint saved channels-last, or from another implementation) or at an
    unaligned address (safetensors packs tensors at 8-byte offsets). load_state_dict without
    ``assign`` copies into the model's own memory; this gives the same tensors without the copy
    where none is needed.
    """
    if value.dtype == target.dtype and value.stride() == target.stride() and not value.data_ptr() % 64:
        return value
    out = torch.empty_strided(target.shape, target.stride(), dtype=target.dtype, device=value.device)
    return out.copy_(value)


def _meta_left(model: nn.Module) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_meta for m in model.modules() for v in _tensors_of(m))


def _tensors_of(module: nn.Module):
    yield from module._parameters.values()
    yield from module._buffers.values()
    yield from module.__dict__.values()


def plain_header(path: str | os.PathLike) -> Header | None:
    """The header of a .safetensors file of ours holding no blocks (None for any other file, which is
    read as a checkpoint); a file that already holds injected blocks is refused."""
    if not (str(path).endswith(".safetensors") and Path(path).is_file()):
        return None
    try:
        header = file_header(path)
    except AttnInjectError:
        return None  # not a file of ours: reading it as a checkpoint says what is wrong with it
    if not header.plain:
        raise AttnInjectError(
            "the file is already patched (it holds an attn_inject recipe)",
            where=str(path),
            hint="Read it with attn_inject.load(path); `attn-inject inspect` shows what it holds.",
        )
    return header
