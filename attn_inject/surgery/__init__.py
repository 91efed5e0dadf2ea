"""Surgery: plan() and inject() (every check, then the one mutation, then verification), the
recipe a patched model remembers, and eject()."""

from .api import inject, plan
from .eject import eject

__all__ = ["eject", "inject", "plan"]
