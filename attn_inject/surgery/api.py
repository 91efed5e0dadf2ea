"""The public entry points: plan (a dry run) and inject (plan, splice, verify)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..blocks import check_block_options, get_block
from ..errors import AttnInjectError
from ..graph.analyze import ModuleRecord
from ..graph.example import example_args, example_forward_failed, first_difference, run, seeded_tensors
from ..graph.example import example_kwargs as example_kwargs_checked
from ..graph.nodes import NodeFacts, facts
from ..graph.preserve import preserved, rng_states, set_rng_states
from ..graph.shapes import analyze_shapes_first
from ..matching.alternates import Alternate, plan_alternates
from ..matching.plan import Plan, Site, build_plan
from ..rules import Rule, resolve_rules
from .checks import (
    check_block_sizes,
    check_flags,
    check_globs,
    check_model,
    check_not_quantized,
    check_not_stacked,
    on_meta_device,
)
from .eject import record_undo
from .frameworks import held_model, is_library_call, owners
from .recipe import Injection, base_recipe, set_recipe
from .splice import Undo, splice
from .verify import alternates_differ, forward_failed_error, mismatch_error

log = logging.getLogger(__name__)

RuleSpec = str | Path | Rule | Iterable[str | Path | Rule]


def plan(
    model: nn.Module,
    block: str,
    after: RuleSpec,
    *,
    include: str | Iterable[str] = (),
    exclude: str | Iterable[str] = (),
    position: str | None = None,
    example_input: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
    stack: bool = False,
    **block_options: Any,
) -> Plan:
    """Where ``inject`` would put ``block`` blocks, without changing the model.

    Args:
        model: any nn.Module (timm, torchvision, your own), or a framework's object holding one
            (an ultralytics ``YOLO``).
        block: a registered block name (``list_blocks()``: "se", "eca", "cbam", "coord", "gct", "gc",
            "ge", "simam", and any block registered with ``register_block``; ``attn-inject blocks``).
        after: a built-in rule name (``list_rules()``), a path to a YAML rule file, or a list.
        include / exclude: globs on module paths (e.g. ``"layer4.*"``).
        position: override the rules' insert position (branch_end, block_output, unit_output, or
            after_convN: after the N-th conv unit of the branch or block, negative N from the end).
        example_input: a tensor or tuple of arguments for the example forward; by default one image
            of the model's configured input size (3x224x224 if it has none), unless ``example_kwargs``
            is given.
        example_kwargs: keyword arguments for the example forward (a dict, or a processor's output
            such as transformers' ``BatchFeature``: ``example_kwargs=processor(images)``); their
            tensors' shapes are remembered in the recipe, so ``load()`` replays with them.
        stack: allow a block where there is attention already. By default a place whose branch (or
            unit, or block) already holds channel attention of the model's own (timm's SEModule,
            EcaModule, ..., or any pool -> conv/linear -> gate -> multiply) is skipped and listed in
            ``misses``, and a place that already has a block of the same type (from an earlier
            inject) is refused, as re-running the same inject usually is a mistake.
        block_options: passed to the block (e.g. SE ``reduction``/``rd_ratio``/``rd_of``/``act``/``gate``,
            ECA ``gamma``/``beta``/``kernel_size``; every block ``init="identity"|"paper"``); they win
            over the options a rule carries.

    The model is run on the example input (on the meta device where the analysis needs no values
    and the example is large: :mod:`attn_inject.graph.shapes`; ``Plan.real_values`` says why not)
    but left exactly as it was: parameters, buffers, every module's attributes and the random
    states (see :mod:`attn_inject.preserve`).
    """
    held = held_model(model)
    if held is not None:
        inner, example = held[1], _default_example(model, example_input)
        return plan(
            inner,
            block,
            after,
            include=include,
            exclude=exclude,
            position=position,
            example_input=example,
            example_kwargs=example_kwargs,
            stack=stack,
            **block_options,
        )
    check_model(model)
    request = _Request.checked(model, block, after, include, exclude, position, stack, block_options)
    kwargs = example_kwargs_checked(example_kwargs)
    args = example_args(model, _default_example(model, example_input), keywords=bool(kwargs))
    return _analyse_and_plan(model, request, args, kwargs).plan


def inject(
    model: nn.Module,
    block: str,
    after: RuleSpec,
    *,
    include: str | Iterable[str] = (),
    exclude: str | Iterable[str] = (),
    position: str | None = None,
    example_input: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
    verify: bool = True,
    stack: bool = False,
    **block_options: Any,
) -> nn.Module:
    """Splice ``block`` into ``model`` wherever ``after`` matches; returns the same (patched) model.

    The model is changed in place (deepcopy it first to keep the original). With the default
    ``init="identity"`` the patched model's outputs equal the original's bit for bit; ``verify``
    runs both on the example input and raises (leaving the model unchanged) if they differ. All
    checks run before the first change: on any error the model is untouched. Arguments are those
    of :func:`plan`.

    Given a framework's object holding a model (an ultralytics ``YOLO``), the model it holds is
    patched, the object is returned, and its workflow is made to keep the blocks (ultralytics: its
    trainer replays the recipe on the model it builds, see ``attn_inject.integrations``).
    """
    example = _default_example(model, example_input)
    held = held_model(model)
    target = model if held is None else held[1]
    check_model(target)
    check_flags(verify=verify)
    if verify and on_meta_device(target):
        raise AttnInjectError(
            f"{type(target).__name__} is on the meta device: it has no values to verify the patched outputs against",
            hint="plan() works on it; inject(..., verify=False) splices the blocks in on the meta device "
            "(materialise with to_empty() and load weights that include the blocks').",
        )
    request = _Request.checked(target, block, after, include, exclude, position, stack, block_options)
    _inject(target, request, position, example, example_kwargs_checked(example_kwargs), verify)
    if held is not None:
        held[0].keep(model)
    elif not is_library_call():
        for framework in owners(model):
            framework.injected(model)
    return model


def _default_example(model: Any, example_input: Any) -> Any:
    """The caller's example input, else a framework's default for its object or model (ultralytics:
    one small image), else None (the model's configured size)."""
    if example_input is not None:
        return example_input
    held = held_model(model)
    frameworks = [held[0]] if held is not None else owners(model)
    return next((f.example_input(model) for f in frameworks), None)


def _inject(
    model: nn.Module, request: _Request, position: str | None, example_input: Any, kwargs: dict[str, Any], verify: bool
) -> None:
    args = example_args(model, example_input, keywords=bool(kwargs))
    planned = _analyse_and_plan(
        model, request, args, kwargs, reference=verify and request.options.get("init", "identity") == "identity"
    )
    the_plan = planned.plan
    injection = Injection.from_plan(the_plan, args, kwargs, request.include, request.exclude, position, request.stack)
    recipe = base_recipe(model).then(injection)
    rng = rng_states()
    try:
        blocks = _build_blocks(the_plan)
        undo = _splice_and_verify(model, planned, blocks)
    except BaseException:
        set_rng_states(rng)  # building the blocks drew their default init
        raise
    record_undo(model, undo)  # for eject(); and the recipe, for save() / load()
    set_recipe(model, recipe)
    for framework in owners(model):
        framework.recipe_changed(model, recipe)


@dataclass(frozen=True)
class _Request:
    """The arguments of one plan/inject call, checked (nothing about the model's forward yet)."""

    block: str
    rules: list[Rule]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    stack: bool
    options: dict[str, Any]

    @classmethod
    def checked(
        cls,
        model: nn.Module,
        block: str,
        after: RuleSpec,
        include: str | Iterable[str],
        exclude: str | Iterable[str],
        position: str | None,
        stack: bool,
        options: dict[str, Any],
    ) -> _Request:
        check_not_quantized(model)
        check_flags(stack=stack)
        check_block_options(block, options)
        rules = resolve_rules(after)
        if position is not None:
            if not isinstance(position, str):
                raise AttnInjectError(
                    f"position must be a string, not {position!r}",
                    hint="Valid: branch_end, block_output, unit_output, "
                    "or after_convN (N a conv index: 1, 2, ..., -1).",
                )
            rules = [r.with_position(position) for r in rules]
        return cls(block, rules, check_globs("include", include), check_globs("exclude", exclude), stack, options)


class _Planned(NamedTuple):
    plan: Plan
    args: tuple  # the example input
    kwargs: dict[str, Any]  # the example's keyword arguments
    reference: Any  # the original model's output on it (None: not verified)
    alternates: tuple[Alternate, ...]  # the sites in the alternate forwards (forward_fuse...)
    writes: tuple[torch.Tensor, ...] | None  # what the forward writes into, if known (``preserved``)


def _analyse_and_plan(
    model: nn.Module, request: _Request, args: tuple, kwargs: dict[str, Any], reference: bool = False
) -> _Planned:
    """The example forward(s) and the plan, checked; leaves the model as it was (``preserved``, in
    ``analyze_shapes_first``, which runs the reference forward too)."""

    def reference_forward() -> Any:
        try:
            return run(model, args, kwargs)
        except Exception as exc:
            raise example_forward_failed(model, exc, args) from None

    with _eval_mode(model):
        analysis, how, expected = analyze_shapes_first(model, args, kwargs, reference_forward if reference else None)
    the_plan = build_plan(
        analysis, request.block, request.options, request.rules, request.include, request.exclude, request.stack
    )
    the_plan = dataclasses.replace(the_plan, real_values=how.real_values)
    if how.real_values is not None:
        log.info("%s was analysed on real tensors: %s", type(model).__name__, how.real_values)
    check_block_sizes(the_plan)
    if not request.stack:
        check_not_stacked(the_plan)
    alternates = plan_alternates(the_plan.site_records, analysis.traces)
    return _Planned(the_plan, args, kwargs, expected, alternates, how.writes)


def _splice_and_verify(model: nn.Module, planned: _Planned, blocks: dict[str, nn.Module]) -> Undo:
    the_plan, args, kwargs, reference = planned.plan, planned.args, planned.kwargs, planned.reference
    what = f"after injecting {the_plan.block} into {type(model).__name__}"
    with _eval_mode(model) as modes:
        undo = splice(the_plan, blocks, planned.alternates)
        try:
            with preserved(model, writes=planned.writes):
                problem = None if reference is None else first_difference(reference, run(model, args, kwargs))
                if reference is not None and problem is None:
                    problem = alternates_differ(planned.alternates)
        except Exception as exc:  # a block that raises, or returns what the next layer cannot take
            undo()
            with preserved(model):
                raise forward_failed_error(what, exc, blocks, _site_inputs(the_plan)) from None
        except BaseException:
            undo()
            raise
        if problem:
            undo()
            with preserved(model):  # tell a nondeterministic model and a non-identity block from a bug here
                raise mismatch_error(
                    what, problem, lambda: run(model, args, kwargs), reference, blocks, _site_inputs(the_plan)
                )
        if the_plan.unreached:
            log.warning("%s; they were left as they are", the_plan.note("unreached"))
        for site in the_plan.sites:  # new blocks follow their owner's mode
            owner = model.get_submodule(site.owner)
            blocks[site.module_name].train(modes.get(owner, owner.training))
    return undo


def _build_blocks(the_plan: Plan) -> dict[str, nn.Module]:
    cls = get_block(the_plan.block)
    blocks = {}
    for site, records in the_plan.site_records:
        anchor = _anchor_facts(records, site)
        block = cls(site.channels, **dict(site.options)).to(anchor.device, anchor.dtype)
        blocks[site.module_name] = block.eval()  # verified in eval mode; then it follows its owner
    return blocks


def _site_inputs(the_plan: Plan) -> dict[str, Any]:
    """A random feature map of each site's shape, dtype and device, to test its block alone."""
    maps = seeded_tensors([site.shape for site in the_plan.sites], torch.float32, torch.device("cpu"))
    inputs = {}
    for (site, records), x in zip(the_plan.site_records, maps):
        anchor = _anchor_facts(records, site)
        inputs[site.module_name] = x.to(anchor.device, anchor.dtype)
    return inputs


def _anchor_facts(records: tuple[ModuleRecord, ...], site: Site) -> NodeFacts:
    """What the example forward saw at a site's anchor: the map the block takes (shape, dtype, device)."""
    anchor = records[0].node(site.anchor)
    if anchor is None:
        raise AssertionError(f"the plan's anchor {site.anchor} is not in the graph of {site.owner or '<model>'}")
    return facts(anchor)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[dict[nn.Module, bool]]:
    """Put every module in eval mode; restore each module's own flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield modes
    finally:
        for module, training in modes.items():
            module.training = training
