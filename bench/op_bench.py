"""Per-op microbenchmarks: every case of op_cases x every provider, one Row each."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

import sr3fast

from . import hardware, metrics
from .op_cases import OpCase, make_callable, provider_unavailable, providers
from .records import Row, measuring
from .timing import Budget, cuda_graph, measure, time_first_call

BASELINE = "torch"


def run_op(cases: list[OpCase], device: torch.device, budget: Budget, compile_mode: str,
           progress: Callable[[str], None] = lambda message: None,
           ceilings: dict | None = None, on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Every provider on every case of one op, with rates, % of peak (and of the `ceilings`
    measured in the same run, when given) and speed-ups over torch."""
    peak, tf32 = hardware.peak_for(device), hardware.tf32_enabled()
    rows = []
    for case in cases:
        for provider in providers(case.op):
            progress(f"{case.op} {case.label} {provider}")
            row = run_case(case, provider, device, budget, compile_mode)
            metrics.add_rates(row, peak, case.dtype(device), tf32, case.primary)
            metrics.add_measured_ceiling(row, ceilings, case.primary)
            rows.append(row)
            on_row(row)
    metrics.add_speedups(rows, BASELINE)
    return rows

def run_case(case: OpCase, provider: str, device: torch.device, budget: Budget, compile_mode: str) -> Row:
    """Measure `provider` on `case`; a skipped or failed Row says why.

    On CUDA, L2 is flushed before every repeat: in the model these operands come from memory."""
    dtype = case.dtype(device)
    row = Row("op", case.op, case.label, provider, str(dtype).removeprefix("torch."))
    reason = provider_unavailable(provider, case.op, device)
    if reason:
        return row.skip(reason)
    setattr(row, case.primary, case.work(dtype))
    backend = provider.split(":", 1)[1] if provider.startswith("sr3fast:") else None
    with measuring(row):
        inputs = case.make_inputs(device, dtype)
        call = make_callable(case, provider, inputs, compile_mode)
        if provider.startswith("sdpa:"):
            refused = _sdpa_refusal(call)
            if refused:
                return row.skip(refused)
        with sr3fast.backend(backend) if backend else nullcontext(), torch.inference_mode():
            if provider == "torch.compile":
                row.compile_s = time_first_call(call, device)
                row.note = f"mode={compile_mode}"
            if device.type == "cuda":
                # Device time: the op's kernels replayed from a CUDA graph, so the host's dispatch
                # cost (Python, the autotuner's lookup, launches) is not in it. The eager call,
                # dispatch included, is kept beside it: at these sizes it can dominate.
                eager = measure(call, device, budget, flush_cache=True)
                row.extra["eager_median_ms"] = eager.median_ms
                timing = measure(cuda_graph(call, device), device, budget, flush_cache=True)
                row.note = "; ".join(filter(None, [row.note, f"eager {eager.median_ms * 1e3:.1f} µs "
                                                   "with host dispatch; time: CUDA-graph replay"]))
            else:
                timing = measure(call, device, budget, flush_cache=True)
        row.set_timing(timing.summary())
    return row


def _sdpa_refusal(call: Callable[[], object]) -> str | None:
    """Why SDPA's forced kernel refuses this case (head width, dtype), or None when it runs."""
    try:
        call()
    except RuntimeError as err:
        if not any(text in str(err) for text in ("No available kernel", "No viable backend")):
            raise
        return "SDPA has no kernel of this kind for this case: " + str(err).splitlines()[0]
    return None
