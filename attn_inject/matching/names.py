"""Names of new submodules: stable and readable (``eca``, ``eca_out``, ``conv1_eca``), numbered on
collision, and timm's empty attention slot where a block fills one.

Where timm's residual blocks keep their own attention as an attribute that is ``None`` when they
have none (ResNet, Res2Net, SKNet: ``self.se``, applied after the last norm, just before the add),
a branch_end block takes that slot's name (``BlockSpec.slots``), so an injected model has the
state_dict keys of timm's hand-written variant (resnet50 + SE = seresnet50, resnet50d + ECA =
ecaresnet50d).
"""

from __future__ import annotations

from ..blocks import BlockSpec
from ..graph.analyze import ModuleRecord
from .candidates import Candidate


class Names:
    """Claims a name per new block, remembering the names taken in each owner module."""

    def __init__(self, spec: BlockSpec):
        self.spec = spec
        self.taken: dict[int, set[str]] = {}

    def claim(self, record: ModuleRecord, position: str, cand: Candidate) -> str:
        owner = record.module
        taken = self.taken.setdefault(id(owner), set())
        if position == "branch_end":
            for slot in self.spec.slots:
                if slot in owner.__dict__ and owner.__dict__[slot] is None and slot not in taken:
                    taken.add(slot)
                    return slot
        base = self.spec.name
        own_prefix = f"{record.path}." if record.path else ""
        if position == "block_output":
            base = f"{self.spec.name}_out"
        elif position == "unit_output" and cand.ops[0].path.startswith(own_prefix):
            local = cand.ops[0].path[len(own_prefix) :]
            base = local.replace(".", "_").replace(":", "") + f"_{self.spec.name}"
        name, i = base, 0
        while name in taken or hasattr(owner, name):
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name
