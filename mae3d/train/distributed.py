"""``torchrun`` support: process group from ``env://``, device choice, small collectives.

Under ``torchrun --nproc_per_node N`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set) the
loop runs data-parallel with DDP: NCCL on GPUs, gloo on CPU. Without those variables it is a
plain single process and nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_agree", "barrier", "init_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this module created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            from mae3d.train.config import UserError

            raise UserError("--device cuda requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the environment (``torchrun``), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = _pick_device(device, local)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                world_size=world)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev, owns)


def shutdown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_agree(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` holds on every rank (one tiny all-reduce; no-op on one process)."""
    if not info.distributed:
        return flag
    t = torch.tensor([0 if flag else 1], device=info.device, dtype=torch.int32)
    dist.all_reduce(t)
    return int(t.item()) == 0


def mean_scalar(value: float, info: DistInfo) -> float:
    """Mean of a Python float over the ranks (for logging)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], device=info.device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size
