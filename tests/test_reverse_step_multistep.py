"""reverse_step with the multistep history term (x0_prev, coefficient m2), on every backend.

    x0     = clamp(a·y_t − b·eps)          y_prev = m0·x0 + m1·y_t + m2·x0_prev + sigma·z

returns (y_prev, x0). Checked: the reference against the formula written out in float64; every
fast backend against the reference (fp32 bound derived as in tests/test_reverse_step.py, with
|m2·x0_prev| added to the magnitudes involved); x0 is the clamped estimate the next step needs;
a zero m2 or a zero history gives the single-step result; in-kernel noise is the same draw with
and without history; reduced precision by DESIGN.md's three-way rule; argument errors.
"""
from __future__ import annotations

import pytest
import torch

import sr3fast
from sr3fast import ops, reference
from support import DEVICE, assert_within_baseline, fast_backend_params, fp32_atol, report

EPS32 = torch.finfo(torch.float32).eps
TINY32 = torch.finfo(torch.float32).tiny
BACKENDS = fast_backend_params("reverse_step")
SHAPES = {
    "odd": (3, 3, 5, 7),
    "two-blocks-ragged": (3, 3, 33, 47),
    "1x1": (3, 8, 1, 1),
    "batch1": (1, 3, 16, 16),
}


def _generator(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _coefs(batch: int, seed: int) -> torch.Tensor:
    """(B, 6), different per sample, in the ranges DPM-Solver++ 2M tables hold: a, b up to ~10,
    m0 up to ~4 and m2 down to ~-3 where the step sizes change fast (r small)."""
    g = _generator(seed)
    lo = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, -3.0])
    hi = torch.tensor([10.0, 10.0, 4.0, 1.0, 0.5, 0.0])
    return (lo + (hi - lo) * torch.rand(batch, 6, generator=g)).to(DEVICE)


def _inputs(shape, seed: int, dtype=torch.float32):
    """y_t, eps, z, x0_prev ~ N(0, 1) (x0_prev within [-1, 1] as a clipped estimate is) and coefs."""
    g = _generator(seed)
    y, eps, z = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(3))
    x0_prev = (torch.rand(shape, generator=g) * 2 - 1).to(DEVICE, dtype)
    return y, eps, z, x0_prev, _coefs(shape[0], seed + 1)


def _per_sample(coefs, like):
    return coefs.double().reshape(coefs.shape[0], 6, *([1] * (like.dim() - 1))).unbind(dim=1)


def _magnitudes(y, eps, z, x0_prev, coefs) -> torch.Tensor:
    """M = |m0|(|a y| + |b eps|) + |m1 y| + |m2 x0_prev| + |sigma z|, elementwise, float64."""
    a, b, m0, m1, sigma, m2 = _per_sample(coefs, y)
    y, eps, z, h = y.double(), eps.double(), z.double(), x0_prev.double()
    return (m0.abs() * ((a * y).abs() + (b * eps).abs()) + (m1 * y).abs() + (m2 * h).abs()
            + (sigma * z).abs())


def _assert_fp32_close(name, actual, expected, magnitudes, ulps=8):
    """Two evaluation orders of the update (with or without FMA contraction) are each within
    4·eps32·M of the exact value (four roundings along any path now that m2·x0_prev adds one), so
    they differ by at most 8·eps32·M, plus one fp32 `tiny` for a flushed subnormal."""
    report(name, actual, expected)
    bound = ulps * EPS32 * magnitudes.to(actual.device) + TINY32
    excess = (actual.double() - expected.double()).abs() - bound
    assert excess.max().item() <= 0, f"{name}: exceeds {ulps}·eps32·M by {excess.max().item():.3e}"


def _fast(backend, *args, **kwargs):
    with sr3fast.backend(backend):
        return ops.reverse_step(*args, **kwargs)


# ------------------------------------------------------------------ the reference itself

@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_reference_matches_formula_float64(clip):
    y, eps, z, h, coefs = _inputs((2, 3, 6, 5), seed=1)
    y_prev, x0 = reference.reverse_step(y, eps, coefs, noise=z, clip=clip, x0_prev=h)
    a, b, m0, m1, sigma, m2 = _per_sample(coefs, y)
    want_x0 = a * y.double() - b * eps.double()
    if clip is not None:
        want_x0 = want_x0.clamp(-clip, clip)
    want = m0 * want_x0 + m1 * y.double() + m2 * h.double() + sigma * z.double()
    _assert_fp32_close("x0", x0, want_x0, (a * y.double()).abs() + (b * eps.double()).abs(), 2)
    _assert_fp32_close("y_prev", y_prev, want, _magnitudes(y, eps, z, h, coefs))
    if clip is not None:
        assert x0.abs().max().item() <= clip


def test_reference_without_history_is_the_single_step_update():
    """No x0_prev is a zero history: the m2 column is unused, the result is the 5-column op's."""
    y, eps, z, h, coefs = _inputs((2, 3, 6, 5), seed=2)
    single = reference.reverse_step(y, eps, coefs[:, :5], noise=z, clip=1.0)
    assert torch.equal(reference.reverse_step(y, eps, coefs, noise=z, clip=1.0), single)
    with_zero_history, _ = reference.reverse_step(y, eps, coefs, noise=z, clip=1.0,
                                                  x0_prev=torch.zeros_like(y))
    torch.testing.assert_close(with_zero_history, single, rtol=0, atol=0)


# ------------------------------------------------------------------ fast backends

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_given_noise_matches_reference_fp32(backend, shape, clip):
    y, eps, z, h, coefs = _inputs(shape, seed=10)
    want_y, want_x0 = reference.reverse_step(y, eps, coefs, noise=z, clip=clip, x0_prev=h)
    got_y, got_x0 = _fast(backend, y, eps, coefs, noise=z, clip=clip, x0_prev=h)
    assert got_y.shape == y.shape and got_y.dtype == y.dtype
    assert got_x0.shape == y.shape and got_x0.dtype == y.dtype
    _assert_fp32_close(f"{backend} y_prev", got_y, want_y, _magnitudes(y, eps, z, h, coefs))
    a, b = (c.double() for c in _per_sample(coefs, y)[:2])
    _assert_fp32_close(f"{backend} x0", got_x0, want_x0,
                       (a * y.double()).abs() + (b * eps.double()).abs(), ulps=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_history_term_is_per_sample_and_exact_in_m2(backend):
    """Changing only sample 1's m2 by 1e-3 moves only sample 1's y_prev, by 1e-3·x0_prev: catches
    a kernel that reads m2 from the wrong column or sample, or drops the term."""
    y, eps, z, h, coefs = _inputs((3, 3, 9, 11), seed=20)
    base, _ = _fast(backend, y, eps, coefs, noise=z, clip=1.0, x0_prev=h)
    nudged = coefs.clone()
    nudged[1, 5] += 1e-3
    moved, _ = _fast(backend, y, eps, nudged, noise=z, clip=1.0, x0_prev=h)
    assert torch.equal(moved[0], base[0]) and torch.equal(moved[2], base[2])
    expected_shift = 1e-3 * h[1].double()
    bound = 8 * EPS32 * _magnitudes(y, eps, z, h, nudged)[1] + TINY32
    assert ((moved[1].double() - base[1].double()) - expected_shift).abs().le(bound).all()
    assert (moved[1] - base[1]).abs().max().item() > 5e-4      # the term is really there


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_m2_equals_single_step(backend):
    """m2 = 0: y_prev equals the single-step op's result on the same inputs (same backend)."""
    y, eps, z, h, coefs = _inputs((2, 4, 13, 7), seed=30)
    coefs[:, 5] = 0
    got, _ = _fast(backend, y, eps, coefs, noise=z, clip=1.0, x0_prev=h)
    single = _fast(backend, y, eps, coefs[:, :5].contiguous(), noise=z, clip=1.0)
    _assert_fp32_close(f"{backend} m2=0", got, single, _magnitudes(y, eps, z, h, coefs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last(backend):
    y, eps, z, h, coefs = _inputs((2, 4, 6, 10), seed=40)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (y, eps, z, h)]
    got_y, got_x0 = _fast(backend, cl[0], cl[1], coefs, noise=cl[2], clip=None, x0_prev=cl[3])
    want_y, want_x0 = reference.reverse_step(y, eps, coefs, noise=z, x0_prev=h)
    _assert_fp32_close(f"{backend} cl", got_y, want_y, _magnitudes(y, eps, z, h, coefs))
    torch.testing.assert_close(got_x0, want_x0, rtol=4 * EPS32, atol=TINY32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_noise_is_the_single_step_draw(backend):
    """Without `noise`, the op draws z from the generator; with history it must draw the same z
    as without (so switching a sampler to multistep does not change its noise stream). sigma = 1
    and every other coefficient 0 make y_prev = z exactly."""
    y, eps, _, h, _ = _inputs((2, 3, 17, 9), seed=50)
    coefs = torch.zeros(2, 6, device=DEVICE)
    coefs[:, 4] = 1.0
    with_history, _ = _fast(backend, y, eps, coefs, clip=None, x0_prev=h,
                            generator=_generator(7, DEVICE))
    without = _fast(backend, y, eps, coefs, clip=None, generator=_generator(7, DEVICE))
    assert torch.equal(with_history, without)
    assert with_history.std().item() > 0.5              # it is noise, not zeros


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_within_baseline(backend, dtype):
    y, eps, z, h, coefs = _inputs((3, 3, 17, 19), seed=60, dtype=dtype)
    want_y, _ = reference.reverse_step(y.float(), eps.float(), coefs, noise=z.float(), clip=1.0,
                                       x0_prev=h.float())
    got_y, got_x0 = _fast(backend, y, eps, coefs, noise=z, clip=1.0, x0_prev=h)
    assert got_y.dtype == dtype and got_x0.dtype == dtype
    a, b, m0, m1, sigma, m2 = coefs.to(dtype).reshape(3, 6, 1, 1, 1).unbind(dim=1)
    x0 = (a * y - b * eps).clamp(-1, 1)
    baseline = m0 * x0 + m1 * y + m2 * h + sigma * z
    atol = fp32_atol(1, _magnitudes(y, eps, z, h, coefs).max().item())
    assert_within_baseline(f"{backend} {dtype}", got_y, want_y, baseline, atol)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("bad, match", [
    ("five-columns", "m2 column"),
    ("x0-shape", "x0_prev"),
])
def test_bad_arguments_raise_clearly(bad, match):
    y, eps, z, h, coefs = _inputs((2, 3, 4, 4), seed=70)
    if bad == "five-columns":
        coefs = coefs[:, :5]
    else:
        h = h[:, :2]
    with pytest.raises(ValueError, match=match):
        ops.reverse_step(y, eps, coefs, noise=z, x0_prev=h)
