"""`sr3fast upscale` across processes: `torchrun --nproc_per_node N -m sr3fast upscale DIR -o OUT`.

Each process takes every N-th file of the sorted list (sr3fast.folders.shard), so the processes
need no communication while they work: no file is sent anywhere, each output is written by the
one process that owns its input. They talk once, at the end: every process's report (written,
skipped, failures) is gathered with torch.distributed over gloo, so that one process prints the
whole run's failures and every process exits with the same status. gloo, even on GPUs: the
report is a few Python objects on the CPU, and gloo needs neither a GPU nor NCCL's set-up.
The process group is created for that gather only, after the work, with a timeout long enough
for the slowest shard (a process that finishes early waits there for the others).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

# How long a finished process waits at the final gather for the others. A process that dies is
# noticed sooner: torchrun stops the others when one fails.
GATHER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Launch:
    """This process's place in the run: torchrun's RANK, WORLD_SIZE and LOCAL_RANK, or a single
    process (0, 1, 0) when they are not set."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ=os.environ) -> "Launch":
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        if "WORLD_SIZE" not in environ:
            return cls()
        try:
            rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
            local_rank = int(environ.get("LOCAL_RANK", rank))
        except (KeyError, ValueError):
            shown = ", ".join(f"{name}={environ.get(name)!r}" for name in names)
            raise ValueError(f"WORLD_SIZE is set, but {shown} do not name this process's place; start "
                             "several processes with torchrun, or unset WORLD_SIZE") from None
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise ValueError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} are not a "
                             "valid process layout (0 <= RANK < WORLD_SIZE)")
        return cls(rank, world_size, local_rank)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class Report:
    """What one process did: outputs written and skipped (--skip-existing), and the failures as
    (input path, message), in the order they happened."""
    written: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def merged(self, others: list["Report"]) -> "Report":
        total = Report(self.written, self.skipped, list(self.failures))
        for other in others:
            total.written += other.written
            total.skipped += other.skipped
            total.failures += other.failures
        total.failures.sort()
        return total


def device_for(name: str, launch: Launch):
    """The torch.device this process runs on, for --device `name` (auto, cpu, cuda, cuda:N, ...).
    'auto' is cuda when a GPU is available, else cpu. Under torchrun, 'auto' and 'cuda' (no
    index) become cuda:LOCAL_RANK, one GPU per process on each machine; an explicit index is
    taken as given. Raises ValueError when the device is unknown or not on this machine."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N "
                         "(N: the GPU's index)") from None
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)          # torch.cuda, torch.mps, torch.xpu, ...
    if module is None or not hasattr(module, "is_available") or not module.is_available():
        no_cuda = device.type == "cuda" and not torch.version.cuda
        raise ValueError(f"--device {name}: no {device.type} device is available on this machine"
                         f"{' (this torch was built without CUDA)' if no_cuda else ''}; use --device cpu")
    count = module.device_count() if hasattr(module, "device_count") else 1
    if device.index is None and launch.distributed:
        if launch.local_rank >= count:
            raise ValueError(f"--device {name}: process LOCAL_RANK={launch.local_rank} needs its own "
                             f"{device.type} device but this machine has {count}; start at most {count} "
                             f"processes per machine (torchrun --nproc_per_node {count})")
        device = torch.device(device.type, launch.local_rank)
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} {device.type} device(s), "
                         f"{device.type}:0 to {device.type}:{count - 1}")
    return device


def gather_reports(report: Report, launch: Launch) -> Report:
    """The whole run's report, on every process: `report` itself for a single process, else every
    process's gathered over gloo (see the module docstring) and merged, failures sorted by path.
    Creates the process group from torchrun's environment (MASTER_ADDR, MASTER_PORT) and destroys
    it again."""
    if not launch.distributed:
        return report.merged([])
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size,
                                timeout=GATHER_TIMEOUT)
    try:
        reports: list = [None] * launch.world_size
        dist.all_gather_object(reports, report)
    finally:
        if created:
            dist.destroy_process_group()
    return Report().merged(reports)
