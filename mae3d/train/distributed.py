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

__all__ = [
    "DistInfo", "barrier", "init_distributed", "parse_device", "pick_device",
    "reduce_loss_and_stop", "shutdown_distributed",
]


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


def parse_device(device: str) -> torch.device | None:
    """``--device`` as a torch.device (None for "auto"); ``UserError`` for anything but auto,
    cpu, cuda and cuda:N. Availability is checked by ``pick_device``."""
    from mae3d.errors import UserError

    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index):
        raise UserError(f"--device {device!r} is not a device this runs on; use auto, cpu, cuda "
                        "or cuda:N")
    return dev


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """The device to train on: "auto" = CUDA when available; a CUDA device must exist."""
    from mae3d.errors import UserError

    dev = parse_device(device)
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} requested but no CUDA device is available")
        count = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda", local_rank % count)
        elif dev.index >= count:
            raise UserError(f"--device {device}: only {count} CUDA device(s) (cuda:0 .. "
                            f"cuda:{count - 1})")
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the environment (``torchrun``), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = pick_device(device, local)
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


def reduce_loss_and_stop(loss: float, stop: bool, info: DistInfo | None) -> tuple[float, bool]:
    """(mean loss over ranks, any rank asked to stop) in one all-reduce; unchanged on one
    process. Every rank gets the same answer, so all stop (or raise) at the same step."""
    if info is None or not info.distributed:
        return loss, stop
    t = torch.tensor([loss, float(stop)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t[0]) / info.world_size, bool(t[1] > 0)
