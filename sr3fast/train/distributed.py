"""The process group of a run: one process, or torchrun's N (NCCL on GPUs, gloo on CPUs)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, validates and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start(device: str | None = None) -> Processes:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1), else run alone.
    device: None picks cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return Processes(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=(
            device if device.type == "cuda" else None))
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def stop(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean(value: torch.Tensor, processes: Processes) -> torch.Tensor:
    """The mean of a tensor over all processes (the tensor itself when alone)."""
    if not processes.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / processes.world_size


def gather(obj, processes: Processes) -> list:
    """Every process's `obj`, in rank order, on every process."""
    if not processes.distributed:
        return [obj]
    gathered = [None] * processes.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def from_main(obj, processes: Processes):
    """Rank 0's `obj`, on every process."""
    if not processes.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()
