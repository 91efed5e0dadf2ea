"""save() and load(): a patched model as one .safetensors file with its recipe in the metadata.

The file holds the patched model's state_dict (or, as an adapter file, only the injected blocks'
tensors and a fingerprint of the base weights) and, under ``attn_inject.recipe``, the JSON recipe
(arch, each injection with its rules' YAML, format version, library versions). ``load`` rebuilds
the architecture, replays the recipe and loads the tensors strictly. Nothing in the file is
imported, called or unpickled: a recipe naming ``package.module:factory`` is only built when the
caller names that arch (or passes ``trust_remote_code=True``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import AttnInjectError
from .recipe import Recipe, injected_key, recipe_of
from .safe_output import atomic_write, check_output

RECIPE_KEY = "attn_inject.recipe"
CONTENT_KEY = "attn_inject.content"  # "model" | "adapter"
FINGERPRINT_KEY = "attn_inject.base_fingerprint"


@dataclass(frozen=True)
class Header:
    """What a .safetensors file says about itself, read without loading its tensors."""

    path: Path
    recipe: Recipe | None  # None: a plain checkpoint
    content: str
    fingerprint: str | None
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


def save(model: nn.Module, path: str | os.PathLike, *, force: bool = False, adapter_only: bool = False) -> Path:
    """Write a model that ``inject`` patched as .safetensors with its recipe; returns the path.

    Refuses an existing ``path`` unless ``force``; writes atomically. ``adapter_only`` keeps only the
    injected blocks' tensors and a fingerprint of the base weights (see ``apply_adapter``).
    """
    return write_patched(model, path, force=force, adapter_only=adapter_only)


def write_patched(model: nn.Module, path: str | os.PathLike, *, force: bool = False, adapter_only: bool = False,
                  check: Callable[[Path], None] | None = None) -> Path:  # fmt: skip
    """``save``; ``check(tmp)`` runs on the written temporary file before it is renamed into place."""
    recipe = saved_recipe(model)
    out = check_output(path, force=force)
    if out.suffix != ".safetensors":
        raise AttnInjectError("the output must be a .safetensors file", where=str(out), hint="Name it NAME.safetensors.")
    metadata = {"format": "pt", RECIPE_KEY: recipe.to_json(), CONTENT_KEY: "adapter" if adapter_only else "model"}
    state = model.state_dict()
    if adapter_only:
        from .adapter import adapter_tensors

        state, metadata[FINGERPRINT_KEY] = adapter_tensors(state, recipe)
    tensors = storable(state)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        if check is not None:
            check(tmp)

    atomic_write(out, write)
    return out


def saved_recipe(model: nn.Module) -> Recipe:
    """The recipe ``save`` writes for ``model``; refuses a model ``inject`` did not patch."""
    recipe = recipe_of(model) if isinstance(model, nn.Module) else None
    if recipe is None or not recipe.injections:
        raise AttnInjectError(
            f"{type(model).__name__} was not patched by inject(), so there is no recipe to save",
            hint="save() writes models returned by inject() or load(); for a plain model use safetensors.torch.save_model.",
        )  # fmt: skip
    return recipe


def storable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: detached, contiguous, none sharing memory with another."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        value = value.detach()
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if ptr in seen or not value.is_contiguous():
            value = value.contiguous().clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = value
    return out


def load(
    path: str | os.PathLike,
    arch: str | None = None,
    *,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The patched model in a file written by ``save`` or ``attn-inject patch``, in eval mode.

    Rebuilds the architecture (``arch`` overrides the recipe's; ``num_classes`` too), replays the
    recipe's injections and loads every tensor strictly; ``map_location`` is the device the tensors
    and model go to, ``dtype`` casts floating-point parameters afterwards. The recipe is
    remembered on the model, so ``save`` and ``eject`` work on the result.
    """
    header = file_header(path)
    recipe = patched_recipe(header)
    if header.content == "adapter":
        raise AttnInjectError(
            "the file is an adapter: it holds only the injected blocks", where=str(header.path),
            hint="Build the base model and call attn_inject.apply_adapter(model, path).",
        )  # fmt: skip
    build_arch = arch_to_build(recipe, arch, trust_remote_code, header.path)
    device = torch.device(map_location)
    tensors = _read_tensors(header.path, device)
    model = rebuild(recipe, build_arch, num_classes if num_classes is not None else recipe.num_classes, tensors, header.path)
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def rebuild(recipe: Recipe, arch: str, num_classes: int | None, tensors: dict[str, torch.Tensor], source: Path) -> nn.Module:
    """``arch`` with the recipe replayed, holding ``tensors`` (every key, strictly)."""
    from .checkpoint import model_holding

    injected = set(recipe.modules)
    base = {k: v for k, v in tensors.items() if not injected_key(k, injected)}
    model = model_holding(arch, num_classes, lambda m: _base_weights(m, base, source))
    replay(model, recipe, str(source))
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing or extra:
        raise AttnInjectError(
            f"the file does not hold what its recipe builds: missing {missing[:3]}, unexpected {extra[:3]}",
            where=str(source), hint="The file is damaged or was edited; write it again with save().",
        )  # fmt: skip
    model.load_state_dict({k: v for k, v in tensors.items() if injected_key(k, injected)}, strict=False)
    return model


def _base_weights(model: nn.Module, base: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    target = model.state_dict()
    missing = [k for k in target if k not in base]
    bad = [k for k in target if k in base and base[k].shape != target[k].shape]
    extra = [k for k in base if k not in target]
    if missing or bad or extra:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"{bad[0]} has shape {list(base[bad[0]].shape)} where the model needs {list(target[bad[0]].shape)}")  # fmt: skip
        raise AttnInjectError(
            f"the file's weights do not fit {type(model).__name__}: {detail}", where=str(source),
            hint="Pass the arch (and num_classes) the file was written for.",
        )  # fmt: skip
    return base


def replay(model: nn.Module, recipe: Recipe, source: str) -> None:
    """Inject each of the recipe's injections into ``model``, checking each lands where it did."""
    from .surgery import inject

    for i, injection in enumerate(recipe.injections):
        inject(
            model, injection.block, list(injection.rules), include=injection.include, exclude=injection.exclude,
            position=injection.position, example_input=_example(model, injection.input_shapes), verify=False,
            **dict(injection.options),
        )  # fmt: skip
        landed = recipe_of(model).injections[-1].modules
        if injection.modules and landed != injection.modules:
            raise AttnInjectError(
                f"injection {i} ({injection.block}) of the recipe put {len(landed)} blocks at other places than "
                f"the {len(injection.modules)} recorded (e.g. {sorted(set(landed) ^ set(injection.modules))[:2]})",
                where=source, hint="Pass the arch the file was written for.",
            )  # fmt: skip


def _example(model: nn.Module, shapes: tuple[tuple[int, ...], ...] | None) -> tuple | None:
    if shapes is None:
        return None
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes)



def arch_to_build(recipe: Recipe, arch: str | None, trust_remote_code: bool, source: Path) -> str:
    """The arch ``load`` builds: the caller's, or the recipe's when that runs no code named by the file."""
    if arch is not None:
        return arch
    if recipe.arch is None:
        raise AttnInjectError("the file's recipe does not name its architecture", where=str(source),
                              hint="Pass arch=... (--arch) naming the model it was written for.")  # fmt: skip
    if ":" in recipe.arch and not recipe.arch.startswith("torchvision:") and not trust_remote_code:
        raise AttnInjectError(
            f"the recipe names the factory {recipe.arch!r}, and a file is never allowed to import code",
            where=str(source), hint=f"If you trust it, pass arch={recipe.arch!r} (--arch) or trust_remote_code=True.",
        )  # fmt: skip
    return recipe.arch


def patched_recipe(header: Header) -> Recipe:
    if header.recipe is None:
        raise AttnInjectError(
            "a plain checkpoint: the file holds no attn_inject recipe", where=str(header.path),
            hint="load() reads files written by save() or `attn-inject patch`; "
            "for a plain checkpoint use attn_inject.checkpoint.load_pretrained(path, arch).",
        )  # fmt: skip
    return header.recipe


def file_header(path: str | os.PathLike) -> Header:
    """The recipe, content kind and tensor shapes of a .safetensors file (no tensor is read)."""
    path = Path(path)
    if not path.exists():
        raise AttnInjectError("no such file", where=str(path), hint="Check the path.")
    if not path.is_file():
        raise AttnInjectError("not a file (a folder?)", where=str(path), hint="Give the path of a .safetensors file.")
    if path.suffix != ".safetensors":
        raise AttnInjectError(f"not a .safetensors file ({path.suffix or 'no suffix'})", where=str(path),
                              hint="Patched models are .safetensors files written by save() or `attn-inject patch`.")  # fmt: skip
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            shapes, dtypes = {}, {}
            for key in handle.keys():
                sl = handle.get_slice(key)
                shapes[key], dtypes[key] = tuple(sl.get_shape()), sl.get_dtype()
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    text = metadata.get(RECIPE_KEY)
    recipe = None if text is None else Recipe.from_json(text, where=f"{path}: recipe")
    content = metadata.get(CONTENT_KEY, "model")
    if content not in ("model", "adapter"):
        raise AttnInjectError(f"unknown content kind {content!r} in the metadata", where=str(path),
                              hint="The file was written by a newer attn_inject or edited; upgrade attn_inject.")  # fmt: skip
    return Header(path, recipe, content, metadata.get(FINGERPRINT_KEY), shapes, dtypes)


def _read_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> AttnInjectError:
    first_line = (str(exc).splitlines() or [""])[0]
    return AttnInjectError(f"not a valid .safetensors file ({first_line})", where=str(path),
                           hint="The file is truncated or damaged; write it again.")  # fmt: skip
