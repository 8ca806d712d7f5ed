"""Peak memory of a measured region.

CUDA: torch.cuda.max_memory_allocated, i.e. bytes of live tensors at their peak (weights, inputs,
activations), reset at the start of the region; the CUDA context and the caching allocator's
spare blocks are not in it.
CPU: the process's peak resident set (VmHWM), reset at the start of the region through
/proc/self/clear_refs. It is what `top` shows: the interpreter, libraries and weights included,
and memory the C allocator kept from earlier rows may count too. Linux only; else unknown.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

CUDA_METHOD = "torch.cuda.max_memory_allocated (live tensors)"
CPU_METHOD = "process peak resident set (VmHWM), interpreter and weights included"


@dataclass
class PeakMemory:
    method: str
    bytes: int | None = None


@contextmanager
def peak_memory(device: torch.device):
    """`with peak_memory(device) as peak: ...`, then peak.bytes (None when unknown)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        peak = PeakMemory(CUDA_METHOD)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = torch.cuda.max_memory_allocated(device)
        return
    peak = PeakMemory(CPU_METHOD)
    resettable = _reset_cpu_peak()
    yield peak
    peak.bytes = _cpu_peak() if resettable else None


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return _cpu_peak() is not None
    except OSError:
        return False


def _cpu_peak() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None
