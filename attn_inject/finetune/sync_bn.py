"""``sync_bn``: BatchNorm statistics over every process under torchrun.

Without it each process normalises its share of the batch with that share's statistics, as DDP
does, so 2 processes do not compute what 1 does on the same global batch. On GPUs, timm's
``convert_sync_batchnorm`` turns BatchNorm (and timm's BatchNormAct) layers into torch's
``SyncBatchNorm``. Its kernels are GPU-only and DDP refuses it on the CPU, so there (gloo) each
BatchNorm layer instead takes a subclass of its own class that, in training, computes the batch
mean and variance over all processes' images with plain tensor ops and a differentiable all_reduce
(its backward sums the gradients over the processes, as SyncBatchNorm's does) and updates the
running statistics from them (the unbiased variance, as BatchNorm does). Parameters, buffers and
state_dict keys stay the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d, convert_sync_batchnorm
from torch import nn

from ..errors import AttnInjectError
from .distributed import Context


class _Synced:
    """The forward of a BatchNorm layer whose training statistics span every process (CPU, gloo)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        if not (bn.training and input.device.type == "cpu" and dist.is_available() and dist.is_initialized()):
            return super().forward(input)  # type: ignore[misc]
        y = global_batch_norm(bn, input)
        if isinstance(bn, BatchNormAct2d):  # timm's norm + drop + act in one layer
            y = bn.act(bn.drop(y))
        return y


class SyncedBatchNorm1d(_Synced, nn.BatchNorm1d):
    pass


class SyncedBatchNorm2d(_Synced, nn.BatchNorm2d):
    pass


class SyncedBatchNorm3d(_Synced, nn.BatchNorm3d):
    pass


class SyncedBatchNormAct2d(_Synced, BatchNormAct2d):
    pass


_ON_CPU: dict[type, type] = {
    nn.BatchNorm1d: SyncedBatchNorm1d,
    nn.BatchNorm2d: SyncedBatchNorm2d,
    nn.BatchNorm3d: SyncedBatchNorm3d,
    BatchNormAct2d: SyncedBatchNormAct2d,
}


def sync_batchnorm(model: nn.Module, context: Context) -> nn.Module:
    """``model`` with synchronised BatchNorm layers (same parameters and buffers, same state_dict keys).

    On GPUs the layers are replaced in their parents by torch's SyncBatchNorm (a BatchNorm at the root
    comes back as a new module); on the CPU each keeps its object and takes a synchronised subclass.
    """
    if context.device.type != "cpu":
        return convert_sync_batchnorm(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _Synced):
            synced = _ON_CPU.get(type(module))
            if synced is None:
                raise AttnInjectError(
                    f"sync_bn on the CPU synchronises BatchNorm1d/2d/3d and timm's BatchNormAct2d, not "
                    f"{type(module).__name__}",
                    where=name or "<model>",
                    hint="Train on GPUs (torch's SyncBatchNorm), or leave out sync_bn.",
                    field="sync_bn",
                )
            module.__class__ = synced  # a subclass adding no state: only forward differs
    return model


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; its backward sums the gradients over the processes too."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


def global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch normalisation of ``x`` with the statistics of every process's batch (training mode)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    local_count = x.new_full((1,), x.numel() // x.shape[1])
    totals = all_reduce(torch.cat([x.sum(dims), local_count]))
    count = totals[-1]
    mean = totals[:-1] / count
    centered = x - mean.view(shape)
    var = all_reduce(centered.square().sum(dims)) / count
    y = centered * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            tracked = bn.num_batches_tracked
            if tracked is not None:
                tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(tracked if tracked is not None else 1)
            n = float(count)
            bn.running_mean.lerp_(mean.detach(), factor)
            bn.running_var.lerp_(var.detach() * (n / max(n - 1, 1.0)), factor)
    return y
