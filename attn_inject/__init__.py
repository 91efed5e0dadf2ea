"""attn_inject: splice identity-initialised SE / ECA channel attention into pretrained CNNs.

    from attn_inject import inject, plan
    for site in plan(model, "eca", after="bottleneck"):   # dry run
        print(site)
    model = inject(model, "eca", after="bottleneck")       # same class, same outputs, bit for bit
    save(model, "model-eca.safetensors"); model = load("model-eca.safetensors")
"""

from .adapter import apply_adapter
from .blocks import list_blocks, register_block
from .eject import eject
from .errors import AttnInjectError
from .plan import Plan, Site
from .rules import Rule, list_rules
from .saving import load, save
from .surgery import inject, plan

__version__ = "0.1.0"

__all__ = [
    "AttnInjectError",
    "Plan",
    "Rule",
    "Site",
    "apply_adapter",
    "eject",
    "inject",
    "list_blocks",
    "list_rules",
    "load",
    "plan",
    "register_block",
    "save",
]
