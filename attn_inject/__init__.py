"""attn_inject: splice identity-initialised SE / ECA channel attention into pretrained CNNs.

    from attn_inject import inject, plan
    for site in plan(model, "eca", after="bottleneck"):   # dry run
        print(site)
    model = inject(model, "eca", after="bottleneck")       # same class, same outputs, bit for bit
"""

from .blocks import list_blocks, register_block
from .errors import AttnInjectError
from .plan import Plan, Site
from .rules import Rule, list_rules
from .surgery import inject, plan

__version__ = "0.1.0"

__all__ = [
    "AttnInjectError",
    "Plan",
    "Rule",
    "Site",
    "inject",
    "list_blocks",
    "list_rules",
    "plan",
    "register_block",
]
