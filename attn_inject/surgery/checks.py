"""Checks of inject/plan arguments and of the planned sites, all run before the model is changed.

Every failure is one AttnInjectError naming the argument, its value and what is valid.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..blocks import get_block
from ..errors import AttnInjectError
from ..graph.nodes import join_path, target_path
from ..matching.plan import Plan


def check_globs(argument: str, value: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        items = tuple(value)
        if all(isinstance(g, str) for g in items):
            return items
    raise AttnInjectError(
        f"{argument}= must be a glob on module paths or a list of globs, not {value!r}",
        hint=f"For example {argument}='layer4.*' or {argument}=['layer3.*', 'layer4.*'].",
    )


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise AttnInjectError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    lazy = [
        p
        for p, m in model.named_modules()
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()  # type: ignore[misc]
    ]
    if lazy:  # the example forward would materialise them, which cannot be taken back
        raise AttnInjectError(
            f"{type(model).__name__} has lazy modules whose parameters are not initialised yet ({', '.join(lazy[:3])})",
            hint="Run one forward on a real input first, then plan or inject.",
        )


def check_flags(**flags: Any) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise AttnInjectError(f"{name}= must be True or False, not {value!r}")


def on_meta_device(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def check_not_quantized(model: nn.Module) -> None:
    """Quantized modules are not convs and norms to the matcher; say so instead of 'nothing matched'."""
    for path, module in model.named_modules():
        quantized = type(module).__module__.startswith(
            ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")
        )
        if quantized or any(
            t.is_quantized for t in (*module._parameters.values(), *module._buffers.values()) if t is not None
        ):
            raise AttnInjectError(
                f"quantized models are not supported ({path or '<model>'} is {type(module).__name__})",
                hint="Inject into the float model, then quantize it "
                "(and fine-tune the blocks before, if you train them).",
            )


# A block may add at most this many parameters at a C-channel site: a C -> C 3x3 conv's worth, or a
# million, whichever is more. SE and ECA with sane options add a small fraction of that.
def parameter_budget(channels: int) -> int:
    return max(9 * channels * channels, 1 << 20)


def check_block_sizes(the_plan: Plan) -> None:
    for site in the_plan.sites:
        if site.params > parameter_budget(site.channels):
            options = ", ".join(f"{k}={v!r}" for k, v in the_plan.options)
            raise AttnInjectError(
                f"block {the_plan.block!r} with {options} would add {site.params:,} parameters "
                f"at {site.path or '<model>'} "
                f"({site.channels} channels), more than {parameter_budget(site.channels):,}",
                hint="Check the block options (e.g. SE reduction, ECA kernel_size).",
            )


def check_not_stacked(the_plan: Plan) -> None:
    """Refuse a site where an earlier inject already put a block of the same type."""
    cls = get_block(the_plan.block)
    for site, records in the_plan.site_records:
        record = records[0]
        anchor = record.node(site.anchor)
        for node in (anchor, *anchor.users) if anchor is not None else ():
            if node.op == "call_module" and type(record.module.get_submodule(target_path(node))) is cls:
                where = join_path(record.path, target_path(node))
                raise AttnInjectError(
                    f"{site.path or '<model>'} already has an {the_plan.block} block at {site.position} ({where})",
                    hint="Injecting the same block twice stacks a second one; "
                    "pass stack=True if that is what you want.",
                )
