"""Every use of torch.fx's private API, in one place, so a torch upgrade is mended here only.

- ``compile_forward`` / ``import_block``: what fx's GraphModule does to turn a graph's source into
  a function and to pickle it by source (``_forward_from_src``, ``_format_import_block``);
- ``pytree_info`` / ``flat_inputs``: the codegen of a graph traced with container arguments, which
  flattens them into one placeholder per tensor (``Graph._codegen``);
- ``is_none_check``: the assert fx adds on an argument fixed to ``None`` (``_assert_is_none``).

It sits in the bottom layer beside ``patched.py``, which needs the first two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx
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
