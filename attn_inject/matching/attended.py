"""Places that already hold channel attention (graph/attention.py): a residual branch with an SE in
it, a conv unit whose map goes straight into an ECA, a block with a gate on its main path, a module
that folds into a conv and a gate (MobileOne's ``use_se``). ``plan`` skips them unless ``stack=True``."""

from __future__ import annotations

from ..graph.analyze import Analysis
from ..graph.attention import attention_in, gated_modules
from .candidates import Candidate


class Attended:
    """Tells where a candidate place already holds channel attention; one analysis' gates, found once."""

    def __init__(self, analysis: Analysis):
        self.gated = gated_modules(analysis)

    def at(self, cand: Candidate) -> str | None:
        """The existing attention in the candidate's place (its path and class), or None."""
        for record, bits in cand.region:
            found = attention_in(record, record.traced_bits.nodes_in(bits), self.gated)
            if found is not None:
                return found
        return None
