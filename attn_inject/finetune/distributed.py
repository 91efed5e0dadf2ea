"""Data-parallel training under torchrun: one process per device, DDP, metrics summed over ranks.

``torchrun --nproc-per-node N -m attn_inject finetune ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
without them everything runs in one process. The backend is nccl on GPUs and gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..errors import AttnInjectError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Context:
    """The process group from torchrun's environment (or a single process), and this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    target = checked_device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Context(rank, world_size, local_rank, target)


def checked_device(device: str) -> torch.device:
    """``device`` as a torch device this machine has: cpu, or cuda / cuda:N with that GPU present."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        target = None
    if target is None or target.type not in ("cpu", "cuda"):
        raise AttnInjectError(f"device={device} is unknown", hint="Use cpu, cuda or cuda:N.", field="device")
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (target.index or 0) >= count:
            raise AttnInjectError(
                f"device={device}: this machine has {count} CUDA devices",
                hint="Use cpu" + (f" or cuda:0 to cuda:{count - 1}." if count else "."),
                field="device",
            )
    return target


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, context: Context) -> nn.Module:
    """DDP around ``model`` when distributed (its trainable parameters at this moment are the ones synced)."""
    if not context.distributed:
        return model
    ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_sum(values: list[float], context: Context) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if not context.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_min(values: list[float], context: Context) -> list[float]:
    """Element-wise minimum of ``values`` over the ranks (float64)."""
    if not context.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()
