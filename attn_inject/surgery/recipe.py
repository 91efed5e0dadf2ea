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
from ..errors import AttnInjectError, first_line
from ..graph.example import example_shapes_problem
from ..matching.plan import Plan
from ..rules.documents import rule_from_yaml, rule_to_yaml
from ..rules.model import Rule, frozen, position_applies
from ..rules.schema import RecipeFields
from .frameworks import owners

FORMAT_VERSION = 1
_ATTRIBUTE = "_attn_inject_recipe"
_JSON_SCALARS = (str, int, float, bool, type(None))

# What a recipe read from a file may hold, checked before anything is parsed further or built: the
# parse, the rules' YAML and every replayed injection (one example forward each) stay bounded.
MAX_RECIPE_CHARS = 256 * 1024
MAX_DEPTH = 16  # JSON nesting (a rule's YAML has its own bound)
MAX_INJECTIONS = 8
MAX_RULES = 16  # per injection
MAX_CLASSES = 100_000  # a head larger than ImageNet-22k's by far


def canonical_json(value: Any) -> str:
    """``value`` as JSON in one canonical form (sorted keys, no spaces), so equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _valid_num_classes(value: Any) -> bool:
    return value is None or (type(value) is int and 0 <= value <= MAX_CLASSES)


def check_num_classes(value: Any, where: str | None = None) -> None:
    """``num_classes`` is None or an int from 0 (no head) to MAX_CLASSES."""
    if not _valid_num_classes(value):
        shown = f"{value!r}" if len(repr(value)) < 30 else f"{repr(value)[:27]}..."
        raise AttnInjectError(
            f"num_classes must be an int from 0 to {MAX_CLASSES:,}, not {shown}",
            where=where,
            hint="Give the number of classes the model's head has.",
        )


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
    input_kwargs: tuple[tuple[str, tuple[int, ...]], ...] = ()  # the example's keyword tensors: (name, shape)
    # blocks also where the model holds channel attention; a recipe without the field was written
    # before such places were skipped, so it reads as True
    stack: bool = False

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        args: tuple,
        kwargs: dict[str, Any],
        include: tuple[str, ...],
        exclude: tuple[str, ...],
        position: str | None,
        stack: bool = False,
    ) -> Injection:
        shapes = tuple(tuple(a.shape) for a in args) if all(isinstance(a, torch.Tensor) for a in args) else None
        keywords = all(isinstance(v, torch.Tensor) for v in kwargs.values())
        return cls(
            plan.block,
            plan.rules,
            plan.options,
            include,
            exclude,
            position,
            shapes,
            tuple(s.module_name for s in plan.sites),
            tuple((k, tuple(v.shape)) for k, v in kwargs.items()) if keywords else (),
            stack,
        )

    def to_dict(self) -> dict[str, Any]:
        written = {
            "block": self.block,
            "options": dict(self.options),
            "rules": [rule_to_yaml(r) for r in self.rules],
            "include": list(self.include),
            "exclude": list(self.exclude),
            "position": self.position,
            "input_shapes": None if self.input_shapes is None else [list(s) for s in self.input_shapes],
            "modules": list(self.modules),
            "stack": self.stack,
        }
        if self.input_kwargs:  # only when given: a file without it reads as before
            written["input_kwargs"] = {k: list(s) for k, s in self.input_kwargs}
        return written


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
        return canonical_json(
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
        """Parse and check a recipe; any problem is an AttnInjectError naming ``where``.

        Bounded before it is parsed (MAX_RECIPE_CHARS) and before anything is built (nesting,
        injections, rules, num_classes, example input sizes).
        """
        if isinstance(text, str) and len(text) > MAX_RECIPE_CHARS:
            raise AttnInjectError(
                f"the recipe is {len(text):,} characters; recipes are at most {MAX_RECIPE_CHARS:,}",
                where=where,
                hint="The file was not written by attn_inject or was edited.",
            )
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError, RecursionError) as exc:
            raise AttnInjectError(
                f"the recipe is not valid JSON ({first_line(exc)})",
                where=where,
                hint="The file was not written by attn_inject or is damaged.",
            ) from None
        if _depth(data) > MAX_DEPTH:
            raise AttnInjectError(f"the recipe is nested more than {MAX_DEPTH} levels deep", where=where)
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
        listed = top.get("injections", list)
        if len(listed) > MAX_INJECTIONS:
            raise top.fail("injections", f"holds {len(listed)} injections; a file may replay at most {MAX_INJECTIONS}")
        injections = tuple(_injection(RecipeFields(d, where, f"injections[{i}]")) for i, d in enumerate(listed))
        num_classes = top.get("num_classes", (int, type(None)))
        if not _valid_num_classes(num_classes):
            raise top.fail("num_classes", f"must be null or an int from 0 to {MAX_CLASSES:,}")
        versions = top.get("versions", dict, default={})
        return cls(
            top.get("arch", (str, type(None))),
            num_classes,
            injections,
            tuple(sorted((str(k), str(v)) for k, v in versions.items())),
            version,
        )


_INJECTION_FIELDS = [
    "block",
    "options",
    "rules",
    "include",
    "exclude",
    "position",
    "input_shapes",
    "modules",
    "input_kwargs",
    "stack",
]


def recipe_from_json(text: str) -> Recipe:
    """A pickled recipe read back (what ``Recipe.__reduce__`` names)."""
    return Recipe.from_json(text, "pickled recipe")


def _injection(fields: RecipeFields) -> Injection:
    fields.only(_INJECTION_FIELDS)
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
    if len(texts) > MAX_RULES:
        raise fields.fail("rules", f"holds {len(texts)} rules; an injection takes at most {MAX_RULES}")
    rules = [rule_from_yaml(text, f"{fields.where}: {fields.path}.rules[{i}]") for i, text in enumerate(texts)]
    shapes = fields.get("input_shapes", (list, type(None)))
    if shapes is not None and not all(_shape(s) for s in shapes):
        raise fields.fail("input_shapes", "must be a list of shapes (lists of positive ints) or null")
    keywords = fields.get("input_kwargs", dict, default={})
    if not all(isinstance(k, str) and _shape(s) for k, s in keywords.items()):
        raise fields.fail("input_kwargs", "must map argument names to shapes (lists of positive ints)")
    problem = example_shapes_problem([*(shapes or ()), *keywords.values()])
    if problem:
        raise fields.fail("input_kwargs" if keywords else "input_shapes", f"asks for more than a file may: {problem}")
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
        tuple((k, tuple(s)) for k, s in keywords.items()),
        fields.get("stack", bool, default=True),
    )


def _depth(data: Any) -> int:
    """How deeply lists and objects nest in parsed JSON (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _shape(value: Any) -> bool:
    """A tensor shape as JSON: a list of positive ints."""
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)


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
