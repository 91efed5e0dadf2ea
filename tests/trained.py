"""Weights that look trained: fresh timm models zero the last norm of each branch, which makes
anything look like the identity."""

import torch
from torch import nn


def looks_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm weights/biases and running statistics, layer scales around 0.5; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) or isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            for name, p in m.named_parameters(recurse=False):
                if name in ("gamma", "layer_scale", "ls"):
                    p.copy_(torch.full_like(p, 0.5) + torch.rand(p.shape, generator=g) * 0.1)
    return model.eval()


def off_identity(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every injected block away from its identity init."""
    from attn_inject.blocks import is_attention_block

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_attention_block(m):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model
