"""Every use of torch.fx's private API, in one place, so a torch upgrade is mended here only.

- ``compile_forward`` / ``import_block``: what fx's GraphModule does to turn a graph's source into
  a function and to pickle it by source (``_forward_from_src``, ``_format_import_block``);
- ``pytree_info`` / ``flat_inputs``: the codegen of a graph traced with container arguments, which
  flattens them into one placeholder per tensor (``Graph._codegen``);
- ``is_none_check``: the assert fx adds on an argument fixed to ``None`` (``_assert_is_none``);
- ``module_slots_held``: fx's per-trace patching of ``nn.Module.__call__`` / ``__getattr__``
  (``_PatchedFnSetAttr``, the record ``_Patcher.patch_method`` makes) redirected to trampolines.

It sits in the bottom layer beside ``patched.py``, which needs the first two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import fx, nn
from torch.fx import _symbolic_trace
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph_module import _format_import_block, _forward_from_src
from torch.package import sys_importer


def compile_forward(src: str, globals_: dict[str, Any]) -> Callable[..., Any]:
    """The ``forward`` function defined by fx-generated ``src``, run in a copy of ``globals_``."""
    return _forward_from_src(src, globals_)


def import_block(globals_: dict[str, Any]) -> str:
    """Python import statements that rebuild ``globals_`` (what a pickled GraphModule stores)."""
    return _format_import_block(globals_, sys_importer)


def pytree_info(graph: fx.Graph) -> Any | None:
    """The in/out pytree specs of a graph traced with list or dict arguments, else None."""
    return getattr(graph._codegen, "pytree_info", None)


def flat_inputs(graph: fx.Graph, root: Any, *args: Any) -> list[Any]:
    """``(root, *args)`` flattened the way the graph's placeholders take them."""
    return list(graph._codegen.process_inputs(root, *args))


def is_none_check(target: Any) -> bool:
    """Whether a call_function target is fx's assert on an argument fixed to None."""
    return target is _assert_is_none


# fx's Tracer.trace sets nn.Module.__call__ and __getattr__ on the class for every trace and sets
# them back after it: four writes of type slots, each of which walks every subclass of nn.Module
# (~1,400 with timm loaded: 0.2 ms for __call__, 0.7 ms for __getattr__) and empties the method
# cache of them all. Inside ``module_slots_held`` the class holds two trampolines instead, set once,
# and each trace's patch and revert swap the function the trampoline calls: the same functions run,
# with no slot writes. A torch without these internals traces as before. (fx's patching of the class
# is process-wide either way: tracing was never safe from several threads at once.)
_target: dict[str, Callable[..., Any]] = {}  # slot name -> the function its trampoline calls now


def _call_trampoline(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return _target["__call__"](self, *args, **kwargs)


def _getattr_trampoline(self: nn.Module, name: str) -> Any:
    return _target["__getattr__"](self, name)


_TRAMPOLINES = {"__call__": _call_trampoline, "__getattr__": _getattr_trampoline}
_PatchedFnSetAttr: Any = getattr(_symbolic_trace, "_PatchedFnSetAttr", None)


class _SlotPatch(_PatchedFnSetAttr or object):  # type: ignore[misc]
    """fx's record of one patch of a class attribute; on nn.Module's two slots it swaps the
    trampoline's target, remembering the one it replaced (what fx's revert sets back)."""

    def _on_slot(self) -> bool:
        return self.frame_dict is nn.Module and self.fn_name in _target

    def patch(self) -> None:
        if not self._on_slot():
            return super().patch()
        self.replaced = _target[self.fn_name]
        _target[self.fn_name] = self.new_fn

    def revert(self) -> None:
        if not self._on_slot():
            return super().revert()
        _target[self.fn_name] = self.replaced


@contextmanager
def module_slots_held() -> Iterator[None]:
    """fx traces inside share one setting of nn.Module's ``__call__`` / ``__getattr__`` slots."""
    if _target or _PatchedFnSetAttr is None or _symbolic_trace._PatchedFnSetAttr is not _PatchedFnSetAttr:
        yield  # nested, or a torch whose fx patches otherwise: fx patches as usual
        return
    originals = {name: nn.Module.__dict__[name] for name in _TRAMPOLINES}
    _target.update(originals)
    try:
        for name, trampoline in _TRAMPOLINES.items():
            setattr(nn.Module, name, trampoline)
        setattr(_symbolic_trace, "_PatchedFnSetAttr", _SlotPatch)  # noqa: B010 (a type, to mypy)
        yield
    finally:
        setattr(_symbolic_trace, "_PatchedFnSetAttr", _PatchedFnSetAttr)  # noqa: B010
        for name, original in originals.items():
            setattr(nn.Module, name, original)
        _target.clear()
