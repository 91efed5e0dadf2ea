"""The tests' names for benchmarks/trained_look.py: one implementation, shared with the zoo benchmark.

Fresh timm models zero the last norm of each branch, which makes anything look like the identity;
``looks_trained`` undoes that, ``off_identity`` moves every injected block away from its init.
"""

from torch import nn
from trained_look import look_trained, move_off_identity


def looks_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm weights, biases and running statistics random, layer scales about 0.5; eval mode."""
    return look_trained(model, seed=seed)


def off_identity(model: nn.Module, seed: int = 1) -> nn.Module:
    """Every injected block moved away from its identity init; returns the model."""
    move_off_identity(model, seed)
    return model
