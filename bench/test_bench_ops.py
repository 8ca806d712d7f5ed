"""The op microbenchmarks as pytest-benchmark tests, for regression tracking across commits.

    pytest bench/                                    # every case x provider on the best device
    pytest bench/ -k groupnorm_silu                  # one op
    pytest bench/ --benchmark-autosave               # store this run under .benchmarks/
    pytest bench/ --benchmark-compare --benchmark-compare-fail=median:10%

`pytest` and `pytest tests` never collect this file (pyproject's testpaths is tests/).
pytest-benchmark times rounds on the host clock, so on a GPU each round ends with a device
synchronize; bench/run.py's CUDA-event numbers are the ones to quote, these are for trends.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import sr3fast
from bench.op_cases import CASES, make_callable, provider_unavailable, providers
from bench.timing import synchronize

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 50 if DEVICE.type == "cuda" else 5
COMPILE_MODE = "max-autotune-no-cudagraphs" if DEVICE.type == "cuda" else "default"


def _params():
    for case in CASES:
        for provider in providers(case.op):
            reason = provider_unavailable(provider, case.op, DEVICE)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            case_id = f"{case.op}-{case.label.replace(' ', '-')}-{provider}"
            yield pytest.param(case, provider, id=case_id, marks=marks)


@pytest.mark.parametrize("case, provider", list(_params()))
def test_op(benchmark, case, provider):
    dtype = case.dtype(DEVICE)
    call = make_callable(case, provider, case.make_inputs(DEVICE, dtype), COMPILE_MODE)
    backend = provider.split(":", 1)[1] if provider.startswith("sr3fast:") else None

    def one_round():
        call()
        synchronize(DEVICE)

    benchmark.group = f"{case.op} {case.label}"
    with sr3fast.backend(backend) if backend else nullcontext(), torch.inference_mode():
        # warm-up rounds (torch.compile compiles in the first) are not in the statistics
        benchmark.pedantic(one_round, warmup_rounds=3, rounds=ROUNDS, iterations=1)

    work = case.work(dtype)
    benchmark.extra_info.update({"dtype": str(dtype), "device": str(DEVICE), case.primary: work})
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        median_s = stats.stats.median
        scale = 1e9 if case.unit == "GB/s" else 1e12
        benchmark.extra_info[case.unit] = work / median_s / scale
    torch._dynamo.reset()
