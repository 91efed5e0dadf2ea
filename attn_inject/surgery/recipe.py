"""The recipe: what was injected into a model, as data that rebuilds it.

``inject`` remembers a :class:`Recipe` on the model it patched (a second ``inject`` appends its
:class:`Injection`); ``save`` writes it as JSON into the .safetensors metadata and ``load`` replays
it. Rules travel as their full YAML text, so a user's rule file is not needed again. A recipe read
from a file is data: every field is checked, nothing in it is imported or called here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import timm
import torch
from torch import nn

from ..blocks import check_block_options, get_block
from ..errors import AttnInjectError
from ..matching.plan import Plan
from ..rules.documents import rule_from_yaml, rule_to_yaml
from ..rules.model import Rule, frozen, position_applies
from ..rules.schema import RecipeFields
from .frameworks import owners

FORMAT_VERSION = 1
_ATTRIBUTE = "_attn_inject_recipe"
_JSON_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Injection:
    """One ``inject`` call: its arguments, and the qualified names of the blocks it added."""

    block: str
    rules: tuple[Rule, ...]  # written as each rule's YAML document
    options: tuple[tuple[str, Any], ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    position: str | None = None
    input_shapes: tuple[tuple[int, ...], ...] | None = None  # the example input (None: the model's default)
    modules: tuple[str, ...] = ()

    @classmethod
    def from_plan(
        cls, plan: Plan, args: tuple, include: tuple[str, ...], exclude: tuple[str, ...], position: str | None
    ) -> Injection:
        shapes = tuple(tuple(a.shape) for a in args) if all(isinstance(a, torch.Tensor) for a in args) else None
        return cls(
            plan.block,
            plan.rules,
            plan.options,
            include,
            exclude,
            position,
            shapes,
            tuple(s.module_name for s in plan.sites),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "options": dict(self.options),
            "rules": [rule_to_yaml(r) for r in self.rules],
            "include": list(self.include),
            "exclude": list(self.exclude),
            "position": self.position,
            "input_shapes": None if self.input_shapes is None else [list(s) for s in self.input_shapes],
            "modules": list(self.modules),
        }


@dataclass(frozen=True)
class Recipe:
    """How to rebuild a patched model: the architecture, then each injection in order."""

    arch: str | None  # a timm name, torchvision:NAME or package.module:factory; None when unknown
    num_classes: int | None = None  # passed to the model factory; None: its default
    injections: tuple[Injection, ...] = ()
    versions: tuple[tuple[str, str], ...] = ()  # of the libraries that wrote it (read from a file)
    format_version: int = FORMAT_VERSION  # of the file it was read from; to_json writes the current one

    @property
    def modules(self) -> tuple[str, ...]:
        """Qualified names of every injected block."""
        return tuple(m for inj in self.injections for m in inj.modules)

    def __reduce__(self) -> tuple:
        """Pickled as its JSON text (a pickled model holds its recipe as data): it reads back checked,
        whatever becomes of the classes behind it, and a pickle can be read inertly for it
        (files/inert_pickle.py) without running anything."""
        return (recipe_from_json, (self.to_json(),))

    def __deepcopy__(self, memo: dict) -> Recipe:
        return self  # immutable

    def then(self, injection: Injection) -> Recipe:
        return dataclasses.replace(self, injections=(*self.injections, injection))

    def to_json(self) -> str:
        for inj in self.injections:
            for key, value in inj.options:
                if not _json_option(value):
                    raise AttnInjectError(
                        f"block option {key}={value!r} cannot be written into a recipe",
                        hint="Use numbers, strings, booleans or None as block options to save the model.",
                    )
        return json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "arch": self.arch,
                "num_classes": self.num_classes,
                "injections": [inj.to_dict() for inj in self.injections],
                "versions": library_versions(),
            }
        )

    @classmethod
    def from_json(cls, text: str, where: str = "recipe") -> Recipe:
        """Parse and check a recipe; any problem is an AttnInjectError naming ``where``."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise AttnInjectError(
                f"the recipe is not valid JSON ({exc})",
                where=where,
                hint="The file was not written by attn_inject or is damaged.",
            ) from None
        top = RecipeFields(data, where, "recipe")
        version = top.get("format_version", int)
        if version > FORMAT_VERSION:
            raise AttnInjectError(
                f"the recipe has format version {version}, newer than this attn_inject reads ({FORMAT_VERSION})",
                where=where,
                hint="Upgrade attn_inject to load this file.",
            )
        if version < 1:
            raise top.fail("format_version", f"must be >= 1, not {version}")
        top.only(["format_version", "arch", "num_classes", "injections", "versions"])
        injections = tuple(
            _injection(RecipeFields(d, where, f"injections[{i}]")) for i, d in enumerate(top.get("injections", list))
        )
        versions = top.get("versions", dict, default={})
        return cls(
            top.get("arch", (str, type(None))),
            top.get("num_classes", (int, type(None))),
            injections,
            tuple(sorted((str(k), str(v)) for k, v in versions.items())),
            version,
        )


def recipe_from_json(text: str) -> Recipe:
    """A pickled recipe read back (what ``Recipe.__reduce__`` names)."""
    return Recipe.from_json(text, "pickled recipe")


def _injection(fields: RecipeFields) -> Injection:
    fields.only(["block", "options", "rules", "include", "exclude", "position", "input_shapes", "modules"])
    block = fields.get("block", str)
    options = fields.get("options", dict, default={})
    if not all(_json_option(v) for v in options.values()):
        raise fields.fail("options", "must map names to numbers, strings, booleans, null or lists of them")
    options = {k: frozen(v) for k, v in options.items()}
    try:
        get_block(block)  # an unknown block names the valid ones
        check_block_options(block, options)
    except AttnInjectError as exc:
        raise AttnInjectError(f"{fields.path}: {exc.what}", where=fields.where, hint=exc.hint) from None
    texts = fields.strings("rules")
    if not texts:
        raise fields.fail("rules", "must hold at least one rule")
    rules = [rule_from_yaml(text, f"{fields.where}: {fields.path}.rules[{i}]") for i, text in enumerate(texts)]
    shapes = fields.get("input_shapes", (list, type(None)))
    if shapes is not None and not all(
        isinstance(s, list) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in s) for s in shapes
    ):
        raise fields.fail("input_shapes", "must be a list of shapes (lists of positive ints) or null")
    position = fields.get("position", (str, type(None)))
    if position is not None and not all(position_applies(rule.kind, position) for rule in rules):
        raise fields.fail("position", f"must be null or a position its rules take, not {position!r}")
    return Injection(
        block,
        tuple(rules),
        tuple(sorted(options.items())),
        tuple(fields.strings("include")),
        tuple(fields.strings("exclude")),
        position,
        None if shapes is None else tuple(tuple(s) for s in shapes),
        tuple(fields.strings("modules")),
    )


def _json_option(value: Any) -> bool:
    """A block option a recipe can hold: a JSON scalar, or a list/tuple of such options (ECA kernel steps)."""
    if isinstance(value, (list, tuple)):
        return all(_json_option(v) for v in value)
    return isinstance(value, _JSON_SCALARS)


# ---------------------------------------------------------------------------------------------
# the recipe remembered on a model


def recipe_of(model: nn.Module) -> Recipe | None:
    """What ``inject`` (or ``files.arch.create_model``, ``load``) remembered on ``model``."""
    return model.__dict__.get(_ATTRIBUTE)


def patched_recipe_of(model: nn.Module) -> Recipe:
    """The recipe of a model ``inject`` patched; a model without one is refused."""
    recipe = recipe_of(model) if isinstance(model, nn.Module) else None
    if recipe is None or not recipe.injections:
        raise AttnInjectError(
            f"{type(model).__name__} was not patched by inject(), so there is no recipe to save",
            hint="save() writes models returned by inject() or load(); "
            "for a plain model use safetensors.torch.save_model.",
        )
    return recipe


def set_recipe(model: nn.Module, recipe: Recipe | None) -> None:
    if recipe is None:
        model.__dict__.pop(_ATTRIBUTE, None)
    else:
        model.__dict__[_ATTRIBUTE] = recipe


def base_recipe(model: nn.Module) -> Recipe:
    """The model's recipe, or one naming its architecture (a timm model, or one a registered framework
    built and names: ultralytics ``ultralytics:yolov8n.yaml``) and nothing else."""
    known = recipe_of(model)
    if known is not None:
        return known
    for framework in owners(model):
        named = framework.arch(model)
        if named is not None:
            return Recipe(*named)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    num_classes = getattr(model, "num_classes", None)
    if arch is not None and not timm.is_model(arch):
        arch = None
    return Recipe(arch, num_classes if arch and isinstance(num_classes, int) else None)


def injected_key(key: str, modules: set[str]) -> bool:
    """Whether a state_dict key belongs to one of the injected blocks ``modules``."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def library_versions() -> dict[str, str]:
    return {"attn_inject": package_version(), "torch": torch.__version__, "timm": timm.__version__}


def package_version() -> str:
    """attn_inject's version, from the installed package's metadata."""
    try:
        return metadata.version("attn_inject")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
