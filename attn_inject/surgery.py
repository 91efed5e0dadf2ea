"""The public entry points: plan (a dry run) and inject (plan, splice, verify)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .analyze import analyze
from .blocks import check_block_options, get_block
from .errors import AttnInjectError
from .plan import Plan, build_plan
from .rules import Rule, resolve_rules
from .splice import splice
from .verify import check_identical, example_args, run

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
    **block_options: Any,
) -> Plan:
    """Where ``inject`` would put ``block`` blocks, without changing the model.

    Args:
        model: any nn.Module (timm, torchvision, your own).
        block: a registered block name (``list_blocks()``: "se", "eca").
        after: a built-in rule name (``list_rules()``), a path to a YAML rule file, or a list.
        include / exclude: globs on module paths (e.g. ``"layer4.*"``).
        position: override the rules' insert position (branch_end, block_output, unit_output, or
            after_convN: after the N-th conv unit of the branch or block, negative N from the end).
        example_input: a tensor or tuple of arguments for the example forward; by default one image
            of the model's configured input size (3x224x224 if it has none).
        block_options: passed to the block (SE ``reduction``/``rd_ratio``/``rd_of``/``act``/``gate``,
            ECA ``gamma``/``beta``/``kernel_size``, both ``init="identity"|"paper"``); they win over
            the options a rule carries.
    """
    return _analyse_and_plan(model, block, after, include, exclude, position, example_input, block_options)[0]


def inject(
    model: nn.Module,
    block: str,
    after: RuleSpec,
    *,
    include: str | Iterable[str] = (),
    exclude: str | Iterable[str] = (),
    position: str | None = None,
    example_input: Any = None,
    verify: bool = True,
    **block_options: Any,
) -> nn.Module:
    """Splice ``block`` into ``model`` wherever ``after`` matches; returns the same (patched) model.

    The model is changed in place (deepcopy it first to keep the original). With the default
    ``init="identity"`` the patched model's outputs equal the original's bit for bit; ``verify``
    runs both on the example input and raises (leaving the model unchanged) if they differ. All
    checks run before the first change: on any error the model is untouched. Arguments are those
    of :func:`plan`.
    """
    the_plan, args, reference = _analyse_and_plan(
        model, block, after, include, exclude, position, example_input, block_options,
        reference=verify and block_options.get("init", "identity") == "identity",
    )  # fmt: skip
    blocks = _build_blocks(the_plan)
    with _eval_mode(model) as modes:
        undo = splice(the_plan, blocks)
        try:
            if reference is not None:
                check_identical(reference, run(model, args), f"after injecting {block} into {type(model).__name__}")
        except BaseException:
            undo()
            raise
        if the_plan.unreached:
            log.warning(
                "%d module(s) with convolutions were not reached by the example forward and were left as they are: %s",
                len(the_plan.unreached), ", ".join(the_plan.unreached),
            )  # fmt: skip
        for site in the_plan.sites:  # new blocks follow their owner's mode
            owner = model.get_submodule(site.owner)
            blocks[site.module_name].train(modes.get(owner, owner.training))
    return model


def _analyse_and_plan(model, block, after, include, exclude, position, example_input, block_options, reference=False):
    if not isinstance(model, nn.Module):
        raise AttnInjectError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    check_block_options(block, block_options)
    with torch.device("meta"):
        get_block(block)(8, **block_options)  # bad option values fail here, before any work
    rules = resolve_rules(after)
    if position is not None:
        rules = [r.with_position(position) for r in rules]
    args = example_args(model, example_input)
    with _eval_mode(model):
        expected = run(model, args) if reference else None
        analysis = analyze(model, args)
    the_plan = build_plan(analysis, block, block_options, rules, _globs(include), _globs(exclude))
    return the_plan, args, expected


def _build_blocks(the_plan: Plan) -> dict[str, nn.Module]:
    cls = get_block(the_plan.block)
    blocks = {}
    for site, records in the_plan.site_records:
        anchor = next(n for n in records[0].graph.nodes if n.name == site.anchor)
        blocks[site.module_name] = cls(site.channels, **dict(site.options)).to(anchor.meta["device"], anchor.meta["dtype"])
    return blocks


def _globs(value: str | Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


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
