"""Timing one callable: warm-up excluded, device synchronised, median and spread of repeats.

On CUDA every repeat is bracketed by a pair of CUDA events recorded back to back on the
current stream, and the host synchronises once at the end: the GPU's own clock times the work,
and a launch-bound callable is still charged for the gaps the host leaves between kernels.
With `flush_cache` a buffer larger than L2 is zeroed before every repeat (outside the events),
so a small operand is read from memory as in the model and not from a warm cache.
On CPU every repeat is timed with `time.perf_counter`; CPU work is synchronous.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Larger than the L2 of any current GPU (H100: 50 MB, H200: 60 MB), as triton's do_bench uses.
_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Budget:
    """How long to measure: `warmup` untimed calls, then repeats until about `target_s` seconds
    of timed work, no fewer than `min_repeats` and no more than `max_repeats`."""
    warmup: int = 3
    min_repeats: int = 5
    max_repeats: int = 200
    target_s: float = 1.0

    def repeats_for(self, estimate_s: float) -> int:
        wanted = math.ceil(self.target_s / max(estimate_s, 1e-9))
        return max(self.min_repeats, min(self.max_repeats, wanted))


@dataclass(frozen=True)
class Timing:
    """Per-repeat times in milliseconds and the statistics reported from them."""
    samples_ms: tuple[float, ...]
    warmup: int

    @property
    def repeats(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def quartiles_ms(self) -> tuple[float, float]:
        """(25th, 75th) percentile; with one sample both are that sample."""
        if len(self.samples_ms) < 2:
            return self.samples_ms[0], self.samples_ms[0]
        q1, _, q3 = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q1, q3

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms)

    def summary(self) -> dict:
        q1, q3 = self.quartiles_ms
        return {"median_ms": self.median_ms, "q1_ms": q1, "q3_ms": q3, "min_ms": self.min_ms,
                "max_ms": self.max_ms, "repeats": self.repeats, "warmup": self.warmup}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_first_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of wall time for one call, synchronised: a compiled callable's compile time
    (plus one execution, small beside it)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(fn: Callable[[], object], device: torch.device, budget: Budget = Budget(),
            flush_cache: bool = False) -> Timing:
    """Time `fn()` on `device` under `budget`; see the module docstring for the method."""
    cuda = device.type == "cuda"
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device) if cuda and flush_cache else None

    for _ in range(budget.warmup):
        fn()
    # One more untimed call sizes the repeat count (it doubles as the last warm-up call).
    estimate_ms = _time_calls(fn, device, 1, flush)[0]
    repeats = budget.repeats_for(estimate_ms / 1e3)

    gc.collect()
    gc.disable()  # as timeit does: a collector pause is not the callable's time
    try:
        samples = _time_calls(fn, device, repeats, flush)
    finally:
        gc.enable()
    return Timing(tuple(samples), warmup=budget.warmup + 1)


def _time_calls(fn, device: torch.device, repeats: int, flush: torch.Tensor | None) -> list[float]:
    if device.type != "cuda":
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return samples
    synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def cuda_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """Capture `fn` (static inputs, already warm: autotuned, compiled) as one CUDA graph and return
    its replay. Warm-up runs on a side stream first, as capture requires."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    synchronize(device)
    return graph.replay
