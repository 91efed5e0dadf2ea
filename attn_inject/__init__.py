"""attn_inject: splice identity-initialised SE / ECA channel attention into pretrained CNNs.

from attn_inject import inject, plan
for site in plan(model, "eca", after="bottleneck"):   # dry run
    print(site)
model = inject(model, "eca", after="bottleneck")       # same class, same outputs, bit for bit
save(model, "model-eca.safetensors"); model = load("model-eca.safetensors")
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

from .blocks import list_blocks, register_block
from .errors import AttnInjectError
from .files.adapters import apply_adapter
from .files.checkpoints import load_pretrained
from .files.saving import load, save
from .integrations import keep_blocks, register_timm_model, unregister_timm_model
from .matching.plan import Plan, Site
from .rules import Rule, list_rules
from .surgery.api import inject, plan
from .surgery.eject import eject
from .surgery.recipe import package_version

__version__ = package_version()

__all__ = [
    "AttnInjectError",
    "Plan",
    "Rule",
    "Site",
    "apply_adapter",
    "eject",
    "inject",
    "keep_blocks",
    "list_blocks",
    "list_rules",
    "load",
    "load_pretrained",
    "plan",
    "register_block",
    "register_timm_model",
    "save",
    "unregister_timm_model",
]

# Modules of the flat layout before the re-layout that stay importable under their old names:
# pickles of patched models (torch.save of the whole model) name the last three, and messages and
# code written for 0.1 name attn_inject.checkpoint.
MOVED_MODULES = {
    "checkpoint": "files.checkpoints",
    "located_yaml": "rules.located_yaml",
    "recipe": "surgery.recipe",
    "splice": "surgery.splice",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``attn_inject.<old name>`` as the module that now holds its code."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        prefix, _, old = fullname.partition(".")
        if prefix != __name__ or old not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(f"{__name__}.{MOVED_MODULES[spec.name.partition('.')[2]]}")

    def exec_module(self, module: ModuleType) -> None:
        pass  # the module it stands for is already executed


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
