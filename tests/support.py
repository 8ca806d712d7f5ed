"""Shared test helpers: the device under test, fast-backend parametrization, tolerance rules."""
from __future__ import annotations

import pytest
import torch

from sr3fast import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST_BACKENDS = ("triton", "cuda", "cpu")


def fast_backend_params(op: str, device: torch.device = DEVICE) -> list:
    """pytest params for every non-reference backend, skipped (with the reason) where it cannot
    run `op` on `device`. Use with @pytest.mark.parametrize("backend", fast_backend_params(op))."""
    params = []
    for name in FAST_BACKENDS:
        reason = backends.unavailable_reason(name, device.type)
        if reason is None and not backends.implements(name, op):
            reason = f"the {name} backend has no {op} kernel"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def report(name: str, actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Print and return (max, mean) absolute error of actual against expected (in fp32)."""
    err = (actual.float() - expected.float()).abs()
    max_err, mean_err = err.max().item(), err.mean().item()
    print(f"{name}: max abs err {max_err:.3e}, mean abs err {mean_err:.3e}")
    return max_err, mean_err


def assert_within_baseline(name: str, fast: torch.Tensor, reference: torch.Tensor,
                           baseline: torch.Tensor, atol: float) -> None:
    """DESIGN.md's rule for reduced precision, without guessing a tolerance:

        err(fast) <= 2 * err(baseline) + atol

    where err is the max (and separately the mean) absolute difference from the fp32 reference,
    and `baseline` is plain PyTorch computing the same thing in the same dtype as `fast`. A fused
    kernel may round differently from PyTorch but must not be materially less accurate.
    """
    assert fast.shape == reference.shape, (fast.shape, reference.shape)
    assert torch.isfinite(fast.float()).all(), f"{name}: non-finite output"
    fast_max, fast_mean = report(f"{name} fast", fast, reference)
    base_max, base_mean = report(f"{name} torch-{baseline.dtype}", baseline, reference)
    assert fast_max <= 2 * base_max + atol, f"{name}: max error {fast_max:.3e} > 2*{base_max:.3e} + {atol:.1e}"
    assert fast_mean <= 2 * base_mean + atol, f"{name}: mean error {fast_mean:.3e} > 2*{base_mean:.3e} + {atol:.1e}"


def fp32_atol(reduction_size: int, magnitude: float = 1.0) -> float:
    """Tolerance for an fp32 result that differs from the fp32 reference only by summation order:
    a sum of n terms of size ~magnitude accumulates rounding error ~ eps32 * sqrt(n) * magnitude
    (random-walk bound), times a safety factor of 8 for the few operations that follow it."""
    return 8 * torch.finfo(torch.float32).eps * max(reduction_size, 1) ** 0.5 * magnitude
