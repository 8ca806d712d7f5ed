"""reverse_step: every fast backend against the reference, the reference against independent
formulations, in-kernel noise by its statistics, and the op's registration (opcheck, compile,
CUDA graphs).

fp32 tolerance, derived: each of the update's fp32 operations rounds to within half an ulp of
its result, and every intermediate is bounded by the "magnitudes involved"
M = |m0|·(|a·y| + |b·eps|) + |m1·y| + |sigma·z|. Either evaluation order (with or without FMA
contraction) is within 3·eps32·M of the exact value, so two of them differ by at most 6·eps32·M
(the clamp is 1-Lipschitz and does not add to it), plus one fp32 `tiny` for a flushed subnormal.

The multistep update y_prev = ((m0·x0 + m1·y) + m2·x0_prev) + sigma·z (Triton tests at the end)
adds one product and one addition. With u = eps32/2, A = |m0|·(|a·y| + |b·eps|), B = |m1·y|,
C = |m2·x0_prev|, D = |sigma·z| and M' = A + B + C + D = M + C: the x0 chain and its product
round by at most 3u·A, the other products by u·B, u·C, u·D, and the three additions by u·(A+B),
u·(A+B+C), u·M'; in all 6u·A + 4u·B + 3u·C + 2u·D <= 3·eps32·M' (FMA contraction only removes
roundings). So M' takes M's place: two evaluations differ by at most 6·eps32·M'. The x0 that the
multistep op returns is fl(fl(a·y) − fl(b·eps)), clamped: within (2u + u²)·(|a·y| + |b·eps|) of
the exact clamped value (the clamp being 1-Lipschitz).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sr3fast
from sr3fast import ops, reference
from support import DEVICE, assert_within_baseline, fast_backend_params, fp32_atol, report

try:  # for a direct test of the Triton kernel's sin/cos helper; its test skips without triton
    import triton
    import triton.language as tl

    from sr3fast.kernels.reverse_step import _sincos_2pi
except ImportError:
    triton = None

EPS32 = torch.finfo(torch.float32).eps
BACKENDS = fast_backend_params("reverse_step")
TRITON_ONLY = [p for p in BACKENDS if p.id == "triton"]


def needs_cuda(test):
    """CUDA-only: skipped here with the reason, marked `cuda` (pyproject's marker) for selection."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="needs a CUDA device")(test))


# ---------------------------------------------------------------------------------- helpers

def _generator(seed: int, device=DEVICE) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _coefs(batch: int, seed: int, device=DEVICE) -> torch.Tensor:
    """(B, 5) float32, different per sample, in the ranges SR3 schedules produce: a = 1/sqrt(g)
    and b = sqrt(1-g)/sqrt(g) up to ~10 at high noise, posterior weights m0, m1 in [0, 1]."""
    g = _generator(seed, "cpu")
    lo = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    hi = torch.tensor([10.0, 10.0, 1.0, 1.0, 0.5])
    return (lo + (hi - lo) * torch.rand(batch, 5, generator=g)).to(device)


def _inputs(shape, seed: int, dtype=torch.float32, device=DEVICE):
    """y_t ~ N(0, 1), eps ~ N(0, 1), z ~ N(0, 1) of `shape` and per-sample coefs."""
    g = _generator(seed, "cpu")
    y, eps, z = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    return y, eps, z, _coefs(shape[0], seed + 1, device)


def _magnitudes(y, eps, z, coefs) -> torch.Tensor:
    """M = |m0|(|a y| + |b eps|) + |m1 y| + |sigma z| elementwise, in float64."""
    c = coefs.double().reshape(coefs.shape[0], 5, *([1] * (y.dim() - 1)))
    a, b, m0, m1, sigma = c.unbind(dim=1)
    y, eps, z = y.double(), eps.double(), z.double()
    return m0.abs() * ((a * y).abs() + (b * eps).abs()) + (m1 * y).abs() + (sigma * z).abs()


def _assert_fp32_close(name, actual, expected, magnitudes, ulps=6):
    """|actual - expected| <= ulps·eps32·M + tiny elementwise (see the module docstring)."""
    report(name, actual, expected)
    bound = ulps * EPS32 * magnitudes + torch.finfo(torch.float32).tiny
    excess = (actual.double() - expected.double()).abs() - bound.to(actual.device)
    assert excess.max().item() <= 0, f"{name}: exceeds {ulps}·eps32·M by {excess.max().item():.3e}"


def _fast(backend, *args, **kwargs):
    with sr3fast.backend(backend):
        return ops.reverse_step(*args, **kwargs)


# Shapes: numel per sample below one 4096-element block, not a multiple of anything (odd),
# spanning two blocks with a ragged tail, 1x1 spatial, and batch 1.
SHAPES = {
    "odd": (3, 3, 5, 7),
    "two-blocks-ragged": (3, 3, 33, 47),
    "1x1": (3, 8, 1, 1),
    "batch1": (1, 3, 16, 16),
}


# ------------------------------------------------------------------ the reference op itself

def test_reference_matches_algorithm_2():
    """With the posterior-mean coefficients and sigma = sqrt(1 - alpha), the x0 form must equal
    the paper's Algorithm 2 update, written here directly in float64:
    y_{t-1} = (y_t - (1 - alpha)/sqrt(1 - g) eps) / sqrt(alpha) + sqrt(1 - alpha) z."""
    batch = 3
    y, eps, z, _ = _inputs((batch, 3, 8, 8), seed=1)
    alpha = torch.tensor([0.999, 0.98, 0.6], dtype=torch.float64, device=DEVICE)
    g = torch.tensor([0.95, 0.3, 0.01], dtype=torch.float64, device=DEVICE)
    g_prev = g / alpha
    coefs = torch.stack([
        1 / g.sqrt(),
        (1 - g).sqrt() / g.sqrt(),
        g_prev.sqrt() * (1 - alpha) / (1 - g),
        alpha.sqrt() * (1 - g_prev) / (1 - g),
        (1 - alpha).sqrt(),
    ], dim=1).float()
    actual = reference.reverse_step(y, eps, coefs, noise=z)
    shape = (batch, 1, 1, 1)
    alpha, g = alpha.reshape(shape), g.reshape(shape)
    expected = ((y.double() - (1 - alpha) / (1 - g).sqrt() * eps.double()) / alpha.sqrt()
                + (1 - alpha).sqrt() * z.double())
    # Coefficient rounding to fp32 adds at most eps32·M to the 3·eps32·M of the arithmetic.
    _assert_fp32_close("reference vs Algorithm 2", actual, expected, _magnitudes(y, eps, z, coefs))


def test_reference_clip_matches_per_sample_loop():
    """The clamped x0 form against a float64 loop over samples using masks instead of clamp."""
    y, eps, z, coefs = _inputs((3, 2, 6, 5), seed=2)
    clip = 1.0
    actual = reference.reverse_step(y, eps, coefs, noise=z, clip=clip)
    rows = []
    for i in range(y.shape[0]):
        a, b, m0, m1, sigma = coefs[i].double().tolist()
        x0 = a * y[i].double() - b * eps[i].double()
        x0 = torch.where(x0 > clip, clip, torch.where(x0 < -clip, -clip, x0))
        rows.append(m0 * x0 + m1 * y[i].double() + sigma * z[i].double())
    _assert_fp32_close("reference vs loop", actual, torch.stack(rows), _magnitudes(y, eps, z, coefs))


def test_reference_draws_noise_from_generator():
    y, eps, z, coefs = _inputs((2, 3, 4, 4), seed=3)
    drawn = reference.reverse_step(y, eps, coefs, generator=_generator(7))
    given_z = reference.reverse_step(y, eps, coefs, noise=torch.randn(y.shape, generator=_generator(7),
                                                                      device=DEVICE))
    assert torch.equal(drawn, given_z)


# ------------------------------------------------------------- fast backends, given noise

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_given_noise_matches_reference_fp32(backend, shape, clip):
    y, eps, z, coefs = _inputs(shape, seed=10)
    expected = reference.reverse_step(y, eps, coefs, noise=z, clip=clip)
    actual = _fast(backend, y, eps, coefs, noise=z, clip=clip)
    assert actual.dtype == y.dtype and actual.shape == y.shape
    _assert_fp32_close(f"{backend} {shape} clip={clip}", actual, expected,
                       _magnitudes(y, eps, z, coefs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_coefficients_are_not_mixed(backend):
    """B = 3 with one sample's coefficients zeroed: only that sample's output is zero."""
    y, eps, z, coefs = _inputs((3, 2, 9, 9), seed=11)
    coefs[1] = 0.0
    actual = _fast(backend, y, eps, coefs, noise=z)
    assert torch.count_nonzero(actual[1]) == 0
    assert torch.count_nonzero(actual[0]) == actual[0].numel()
    _assert_fp32_close(f"{backend} per-sample", actual,
                       reference.reverse_step(y, eps, coefs, noise=z), _magnitudes(y, eps, z, coefs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_coefficient_row(backend):
    """coefs may be one row expanded over the batch (stride 0), as a sampler's table row is."""
    y, eps, z, coefs = _inputs((3, 2, 5, 5), seed=12)
    row = coefs[:1].expand(3, 5)
    _assert_fp32_close(f"{backend} expanded coefs", _fast(backend, y, eps, row, noise=z),
                       reference.reverse_step(y, eps, row, noise=z), _magnitudes(y, eps, z, row))


# Per-sample sizes that reach both code paths of each kernel: 35 elements (not a multiple of 4 or
# 8) leave the C++ kernel a scalar tail after its vector lanes, and send the CUDA kernel down its
# element-wise path; 32 fill whole vectors and CUDA's packed quads.
NAN_SHAPES = {"tail": (2, 1, 5, 7), "aligned": (2, 1, 4, 8)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", NAN_SHAPES.values(), ids=NAN_SHAPES.keys())
def test_clip_propagates_nan(backend, shape):
    """A NaN from a diverging model must stay NaN through the clip, as with torch.clamp, while
    ±inf clips to ∓clip like any other value out of range. min/max instructions drop a NaN
    operand (fminf(fmaxf(NaN, -c), c) = -c), so each NaN sits in a vector lane and in the last
    element of a sample, which the C++ kernel computes with the scalar update it shares with the
    CUDA kernel (csrc/reverse_step/math.h)."""
    y, eps, z, coefs = _inputs(shape, seed=13)
    flat = eps.view(shape[0], -1)
    nan_at = [(0, 1), (1, 2), (0, flat.shape[1] - 1), (1, flat.shape[1] - 1)]
    inf_at = {(0, 3): float("inf"), (1, 4): float("-inf"), (1, flat.shape[1] - 2): float("inf")}
    for at in nan_at:
        flat[at] = float("nan")
    for at, value in inf_at.items():
        flat[at] = value
    actual = _fast(backend, y, eps, coefs, noise=z, clip=1.0)
    expected = reference.reverse_step(y, eps, coefs, noise=z, clip=1.0)
    nan = torch.isnan(actual.view(shape[0], -1))
    assert sorted(map(tuple, nan.nonzero().tolist())) == sorted(nan_at), "NaN lost or added"
    assert torch.equal(torch.isnan(expected), torch.isnan(actual))
    # everything else as in any other step; an infinite eps contributes a clipped x0 of size 1
    finite_eps = torch.where(eps.isfinite(), eps, 0.0)
    magnitudes = _magnitudes(y, finite_eps, z, coefs)
    magnitudes += (~eps.isfinite()) * coefs[:, 2].abs().reshape(-1, 1, 1, 1)
    keep = ~torch.isnan(expected)
    _assert_fp32_close(f"{backend} with NaN/inf eps", actual[keep], expected[keep],
                       magnitudes[keep])
    if backend == "cpu":  # the C++ kernel is exact: same float32 operations in the same order
        assert torch.equal(actual[keep], expected[keep])


# --------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise_given", [True, False], ids=["noise", "in-kernel"])
def test_channels_last_stays_channels_last(backend, noise_given):
    y, eps, z, coefs = (t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                        for t in _inputs((2, 5, 6, 7), seed=20))
    actual = _fast(backend, y, eps, coefs, noise=z if noise_given else None, generator=_generator(0))
    assert actual.is_contiguous(memory_format=torch.channels_last)
    if noise_given:
        _assert_fp32_close(f"{backend} channels-last", actual,
                           reference.reverse_step(y, eps, coefs, noise=z),
                           _magnitudes(y, eps, z, coefs))
    else:  # sigma = 0 removes the noise, whose order follows memory: compare the rest exactly
        coefs[:, 4] = 0.0
        actual = _fast(backend, y, eps, coefs, generator=_generator(0))
        _assert_fp32_close(f"{backend} channels-last sigma=0", actual,
                           reference.reverse_step(y, eps, coefs, noise=torch.zeros_like(y)),
                           _magnitudes(y, eps, z * 0, coefs))


def _layouts(y, eps, z):
    """(name, y, eps, z) in layouts that leave the fast path: mixed, strided views, batch inner."""
    cl = torch.channels_last
    return [
        ("y channels-last, eps/z contiguous", y.contiguous(memory_format=cl), eps, z),
        ("eps channels-last, y/z contiguous", y, eps.contiguous(memory_format=cl), z),
        ("strided view", *(torch.stack([t, t], dim=-1)[..., 0] for t in (y, eps, z))),
        ("batch innermost", *(t.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
                              for t in (y, eps, z))),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_fallbacks(backend):
    y, eps, z, coefs = _inputs((2, 3, 5, 6), seed=21)
    expected = reference.reverse_step(y, eps, coefs, noise=z, clip=2.0)
    for name, yl, el, zl in _layouts(y, eps, z):
        actual = _fast(backend, yl, el, coefs, noise=zl, clip=2.0)
        _assert_fp32_close(f"{backend} {name}", actual, expected, _magnitudes(y, eps, z, coefs))
        if yl.is_contiguous(memory_format=torch.channels_last):
            assert actual.is_contiguous(memory_format=torch.channels_last), name


# -------------------------------------------------------------------- reduced precision

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_reduced_precision_within_baseline(backend, dtype, clip):
    """DESIGN.md's three-way rule: fp32 reference on the same (rounded) inputs, the fast op in
    `dtype`, and plain torch computing the update in `dtype`."""
    y, eps, z, coefs = _inputs((3, 3, 17, 19), seed=30, dtype=dtype)
    expected = reference.reverse_step(y.float(), eps.float(), coefs, noise=z.float(), clip=clip)
    actual = _fast(backend, y, eps, coefs, noise=z, clip=clip)
    assert actual.dtype == dtype
    a, b, m0, m1, sigma = coefs.to(dtype).reshape(3, 5, 1, 1, 1).unbind(dim=1)
    x0 = a * y - b * eps
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    baseline = m0 * x0 + m1 * y + sigma * z
    atol = fp32_atol(1, _magnitudes(y, eps, z, coefs).max().item())
    assert_within_baseline(f"{backend} {dtype}", actual, expected, baseline, atol)


# ------------------------------------------------------------------- in-kernel noise

def _unit_noise_coefs(batch: int) -> torch.Tensor:
    """a = b = m0 = m1 = 0, sigma = 1: y_prev is exactly the drawn z."""
    coefs = torch.zeros(batch, 5, device=DEVICE)
    coefs[:, 4] = 1.0
    return coefs


def _corr(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double().flatten(), v.double().flatten()
    u, v = u - u.mean(), v - v.mean()
    return (u @ v / (u.norm() * v.norm())).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_noise_statistics(backend):
    """z must look like iid N(0, 1). Every bound is 6 standard deviations of its estimator under
    that hypothesis (a false alarm about once in 5e8 per check), with n draws: mean: sd
    1/sqrt(n); variance: sd sqrt(2/n); fourth moment (3 for a normal): sd sqrt((105 - 9)/n);
    P(|z| < 1): sd sqrt(p(1-p)/n); the sample correlation of two independent series of m
    values: sd 1/sqrt(m)."""
    batch, shape = 4, (4, 1, 128, 128)
    y = torch.zeros(shape, device=DEVICE)
    z = _fast(backend, y, y, _unit_noise_coefs(batch), generator=_generator(1)).double()
    n = z.numel()
    mean, var, fourth = z.mean().item(), z.var().item(), z.pow(4).mean().item()
    p = math.erf(1 / math.sqrt(2))
    inside = (z.abs() < 1).double().mean().item()
    print(f"n={n} mean={mean:.2e} var={var:.5f} E[z^4]={fourth:.4f} P(|z|<1)={inside:.5f} "
          f"(expected {p:.5f})")
    assert abs(mean) <= 6 / math.sqrt(n)
    assert abs(var - 1) <= 6 * math.sqrt(2 / n)
    assert abs(fourth - 3) <= 6 * math.sqrt(96 / n)
    assert abs(inside - p) <= 6 * math.sqrt(p * (1 - p) / n)

    # Independence between samples and between neighbours. Lags 1-3 share one Philox
    # evaluation in the Triton kernel (lag 1: one Box-Muller pair), lag 4 the next one; the
    # checks hold for any backend. Squares catch dependence that leaves correlation at zero
    # (z1 = ±z0 would).
    per_sample = z.shape[1:].numel()
    pairs = {"samples 0/1": (z[0].flatten(), z[1].flatten())}
    flat = z[0].flatten()
    for lag in (1, 2, 3, 4):
        pairs[f"lag {lag}"] = (flat[:-lag], flat[lag:])
    for name, (u, v) in pairs.items():
        corr, corr_sq = _corr(u, v), _corr(u * u, v * v)
        print(f"{name}: corr {corr:.2e}, corr of squares {corr_sq:.2e}")
        assert abs(corr) <= 6 / math.sqrt(per_sample - 4)
        assert abs(corr_sq) <= 6 / math.sqrt(per_sample - 4)


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_sincos_2pi_matches_float64(backend):
    """The Triton kernel's own sin/cos of 2πu (see kernels/reverse_step.py) against float64, on
    every quadrant boundary and random points. Bound: the reduction is exact, p = f·π/2 and the
    Horner steps round to a few eps32 of values <= 1, truncation is below 3e-8: 4·eps32."""
    boundaries = torch.arange(0, 16, dtype=torch.float64) / 16
    near = torch.cat([boundaries, (boundaries - 2.0**-24).clamp(min=0), boundaries + 2.0**-24])
    u = torch.cat([near, torch.rand(4096, generator=_generator(9, "cpu"), dtype=torch.float64)])
    u = u.float().clamp(max=1 - 2.0**-24).to(DEVICE)
    sin, cos = _sincos_probe(u)
    angle = 2 * math.pi * u.double()
    for name, actual, expected in (("sin", sin, angle.sin()), ("cos", cos, angle.cos())):
        max_err, _ = report(f"{name}(2πu)", actual, expected)
        assert max_err <= 4 * EPS32


if triton is not None:
    @triton.jit
    def _sincos_probe_kernel(u_ptr, sin_ptr, cos_ptr, n, BLOCK: tl.constexpr):
        """sin_ptr[i], cos_ptr[i] = _sincos_2pi(u_ptr[i]) for i < n; all (n,) float32."""
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        sin, cos = _sincos_2pi(tl.load(u_ptr + offsets, mask=mask, other=0.0))
        tl.store(sin_ptr + offsets, sin, mask=mask)
        tl.store(cos_ptr + offsets, cos, mask=mask)


def _sincos_probe(u: torch.Tensor):
    sin, cos = torch.empty_like(u), torch.empty_like(u)
    _sincos_probe_kernel[(triton.cdiv(u.numel(), 1024),)](u, sin, cos, u.numel(), BLOCK=1024)
    return sin, cos


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_noise_seeding(backend):
    """Same generator seed => same output; successive calls and other seeds => fresh noise; the
    default generator is used when none is given and torch.manual_seed reproduces it."""
    y, eps, _, coefs = _inputs((2, 3, 20, 20), seed=40)
    gen = _generator(5)
    first, second = (_fast(backend, y, eps, coefs, generator=gen) for _ in range(2))
    again = _fast(backend, y, eps, coefs, generator=_generator(5))
    other = _fast(backend, y, eps, coefs, generator=_generator(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, second) and not torch.equal(first, other)
    # fresh noise everywhere, not only somewhere: all but (by chance) a few elements differ
    assert (first != second).float().mean().item() > 0.99
    torch.manual_seed(123)
    default_a = _fast(backend, y, eps, coefs)
    torch.manual_seed(123)
    default_b = _fast(backend, y, eps, coefs)
    assert torch.equal(default_a, default_b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_sigma_zero_is_exactly_noise_free(backend, clip):
    y, eps, z, coefs = _inputs((3, 3, 11, 13), seed=41)
    coefs[:, 4] = 0.0
    drawn = _fast(backend, y, eps, coefs, clip=clip, generator=_generator(2))
    zero_noise = _fast(backend, y, eps, coefs, noise=torch.zeros_like(y), clip=clip)
    assert torch.equal(drawn, zero_noise)
    _assert_fp32_close(f"{backend} sigma=0", drawn,
                       reference.reverse_step(y, eps, coefs, noise=torch.zeros_like(y), clip=clip),
                       _magnitudes(y, eps, z * 0, coefs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_noise_enters_scaled_by_sigma(backend):
    """(y_prev - noise-free part) / sigma recovers z with unit scale for each sample's sigma."""
    y, eps, _, coefs = _inputs((3, 1, 64, 64), seed=42)
    coefs[:, 4] = torch.tensor([0.1, 0.5, 2.0], device=DEVICE)
    drawn = _fast(backend, y, eps, coefs, generator=_generator(3)).double()
    noise_free = reference.reverse_step(y, eps, coefs, noise=torch.zeros_like(y)).double()
    z = (drawn - noise_free) / coefs[:, 4].double().reshape(3, 1, 1, 1)
    n = z[0].numel()
    for i in range(3):
        std = z[i].std().item()
        print(f"sample {i}: sigma={coefs[i, 4].item()} recovered std {std:.4f}")
        assert abs(std - 1) <= 6 * math.sqrt(1 / (2 * n))  # sd of a sample std: 1/sqrt(2n)


# ------------------------------------------------------------- randomized over shapes

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(batch=st.integers(1, 4), channels=st.integers(1, 5), height=st.integers(1, 40),
       width=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       clip=st.sampled_from([None, 0.5, 3.0]), channels_last=st.booleans())
def test_random_shapes(backend, batch, channels, height, width, dtype, clip, channels_last):
    shape = (batch, channels, height, width)
    y, eps, z, coefs = _inputs(shape, seed=50, dtype=dtype)
    if channels_last:
        y, eps, z = (t.contiguous(memory_format=torch.channels_last) for t in (y, eps, z))
    actual = _fast(backend, y, eps, coefs, noise=z, clip=clip)
    expected = reference.reverse_step(y.float(), eps.float(), coefs, noise=z.float(), clip=clip)
    magnitudes = _magnitudes(y, eps, z, coefs)
    if dtype == torch.float32:
        _assert_fp32_close(f"{backend} {shape}", actual, expected, magnitudes)
    else:  # the fp32 result, rounded once to bf16
        report(f"{backend} {shape} bf16", actual, expected)
        fp32_error = 6 * EPS32 * magnitudes
        ulps = _bf16_store_rounding_ulps(backend)
        bound = ulps * torch.finfo(dtype).eps * (expected.double().abs() + fp32_error) + fp32_error
        assert ((actual.double() - expected.double()).abs() <= bound).all()


def _bf16_store_rounding_ulps(backend: str) -> float:
    """Error of the final fp32 -> bf16 store, in bf16 ulps of the value: 1/2 when rounding to
    nearest, as CUDA and the C++ kernels do; 1 for Triton's CPU interpreter, which truncates
    that conversion (triton/runtime/interpreter.py, _convert_float without a rounding mode)."""
    return 1.0 if backend == "triton" and DEVICE.type == "cpu" else 0.5


# ---------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("backend", TRITON_ONLY)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_gradients_match_reference(backend, clip):
    y, eps, z, coefs = _inputs((2, 3, 6, 6), seed=60)
    grad_out = torch.randn(y.shape, generator=_generator(61), device=DEVICE)

    def grads(fn):
        yy, ee = y.clone().requires_grad_(), eps.clone().requires_grad_()
        fn(yy, ee, coefs, noise=z, clip=clip).backward(grad_out)
        return yy.grad, ee.grad

    fast = grads(lambda *a, **k: _fast(backend, *a, **k))
    ref = grads(reference.reverse_step)
    for name, f, r in zip(("d/dy_t", "d/deps"), fast, ref):
        # both are products of fp32 coefficients and grad_out: a few fp32 roundings each
        report(f"{backend} {name}", f, r)
        torch.testing.assert_close(f, r, rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_gradient_for_coefs_raises(backend):
    y, eps, z, coefs = _inputs((2, 3, 4, 4), seed=62)
    out = _fast(backend, y, eps, coefs.requires_grad_(), noise=z)
    with pytest.raises(NotImplementedError, match="coefs or noise"):
        out.sum().backward()


# ------------------------------------------------------------------------ registration

def _op_args(noise_given: bool):
    from sr3fast.ops.triton.reverse_step import draw_seed
    y, eps, z, coefs = _inputs((2, 3, 5, 7), seed=70)
    if noise_given:
        return (y, eps, coefs, z, None, 1.0)
    return (y, eps, coefs, None, draw_seed(DEVICE, _generator(0)), None)


# Under the CPU interpreter the op's fake implementation (its own body, as triton_op registers
# it) launches the interpreted kernel on FakeTensors, whose data pointers fake tracing forbids.
_fake_needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the Triton CPU interpreter cannot run on FakeTensors (no data pointers); runs on CUDA")
OPCHECKS = [
    pytest.param(["test_schema", "test_autograd_registration"], id="schema+autograd"),
    pytest.param(["test_faketensor"], id="faketensor", marks=_fake_needs_cuda),
    pytest.param(["test_aot_dispatch_static", "test_aot_dispatch_dynamic"], id="aot_dispatch",
                 marks=_fake_needs_cuda),
]


@pytest.mark.parametrize("backend", TRITON_ONLY)
@pytest.mark.parametrize("checks", OPCHECKS)
@pytest.mark.parametrize("noise_given", [True, False], ids=["noise", "seed"])
def test_opcheck(backend, checks, noise_given):
    args = _op_args(noise_given)
    args[0].requires_grad_()  # exercises the autograd registration
    torch.library.opcheck(torch.ops.sr3fast.reverse_step_triton.default, args, test_utils=checks)


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """No graph break, no recompilation when only coefficient values change, the same results
    as eager, and in-kernel noise reproducible under torch.manual_seed."""
    y, eps, z, coefs = _inputs((2, 3, 32, 32), seed=80)

    @torch.compile(fullgraph=True)
    def step(y, eps, coefs, noise):
        return ops.reverse_step(y, eps, coefs, noise=noise, clip=1.0)

    with sr3fast.backend(backend):  # selected outside: the compiled graph guards on it
        compiled = step(y, eps, coefs, z)
        step(y, eps, coefs, None)  # the in-kernel-noise variant is a second graph
        other = _coefs(2, seed=81)
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled_other = step(y, eps, other, z)
            torch.manual_seed(0)
            a = step(y, eps, other, None)
            torch.manual_seed(0)
            b = step(y, eps, other, None)
            c = step(y, eps, other, None)
    for name, actual, k in (("compiled", compiled, coefs), ("compiled, new coefs", compiled_other, other)):
        _assert_fp32_close(f"{backend} {name}", actual,
                           reference.reverse_step(y, eps, k, noise=z, clip=1.0),
                           _magnitudes(y, eps, z, k))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replays_fresh_reproducible_noise(backend):
    """A captured three-step loop with in-kernel noise: each replay draws fresh noise, re-seeding
    the generator reproduces a replay, and a replay equals eager execution from the same seed."""
    y0, eps, _, _ = _inputs((2, 3, 32, 32), seed=90)
    table = torch.stack([_coefs(2, seed=91 + k) for k in range(3)])

    def sample(y):
        with sr3fast.backend(backend):
            for k in range(3):
                y = ops.reverse_step(y, eps, table[k], clip=1.0)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: compiles and loads the kernels
        sample(y0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(y0)

    torch.cuda.manual_seed(1234)
    graph.replay()
    first = out.clone()
    graph.replay()
    second = out.clone()
    torch.cuda.manual_seed(1234)
    graph.replay()
    again = out.clone()
    torch.cuda.manual_seed(1234)
    eager = sample(y0)
    torch.cuda.synchronize()
    report("graph replay vs eager", first, eager)
    assert torch.isfinite(first).all()
    assert not torch.equal(first, second)
    assert torch.equal(first, again)
    assert torch.equal(first, eager)


# ------------------------------------------- multistep update (x0_prev), Triton backend
#
# Every backend's ops.reverse_step(x0_prev=...) is compared with the reference in
# tests/test_reverse_step_multistep.py. Here: the Triton op itself (its registration, its x0
# output, its noise), called through the backend module, so that the tests need no other layer.

def _triton_step(*args, **kwargs):
    from sr3fast.ops.triton.reverse_step import reverse_step as triton_reverse_step
    return triton_reverse_step(*args, **kwargs)


def _coefs6(batch: int, seed: int, device=DEVICE) -> torch.Tensor:
    """(B, 6) float32: _coefs's five columns and m2 in [-1, 1] (DPM-Solver++ 2M's history weight
    is negative and below 1 in size)."""
    m2 = 2 * torch.rand(batch, 1, generator=_generator(seed + 100, "cpu")) - 1
    return torch.cat([_coefs(batch, seed, "cpu"), m2], dim=1).to(device)


def _history_inputs(shape, seed: int, dtype=torch.float32):
    """y_t, eps, z ~ N(0, 1), x0_prev uniform in [-1, 1] (a clipped x0), coefs (B, 6)."""
    y, eps, z, _ = _inputs(shape, seed, dtype)
    x0_prev = (2 * torch.rand(shape, generator=_generator(seed + 2, "cpu")) - 1).to(DEVICE, dtype)
    return y, eps, z, x0_prev, _coefs6(shape[0], seed + 1)


def _magnitudes_history(y, eps, z, coefs, x0_prev) -> torch.Tensor:
    """M' = M + |m2·x0_prev| (the module docstring), in float64."""
    m2 = coefs[:, 5].double().reshape(coefs.shape[0], *([1] * (y.dim() - 1)))
    return _magnitudes(y, eps, z, coefs[:, :5]) + (m2 * x0_prev.double()).abs()


def _multistep_float64(y, eps, z, coefs, x0_prev, clip, x0_prev2=None):
    """(y_prev, clamped x0, |a·y| + |b·eps|) in float64, from the inputs' stored values;
    coefs (B, 6), or (B, 7) with x0_prev2."""
    c = coefs.double().reshape(coefs.shape[0], coefs.shape[1], *([1] * (y.dim() - 1)))
    a, b, m0, m1, sigma, m2 = c.unbind(dim=1)[:6]
    y, eps, z, x0_prev = (t.double() for t in (y, eps, z, x0_prev))
    x0 = a * y - b * eps
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    y_prev = m0 * x0 + m1 * y + m2 * x0_prev + sigma * z
    if x0_prev2 is not None:
        y_prev = y_prev + c[:, 6] * x0_prev2.double()
    return y_prev, x0, (a * y).abs() + (b * eps).abs()


MULTISTEP_CASES = {
    # y_t's dtype, the history's dtype, y_t channels-last (the history stays contiguous: a layout
    # copy), a second history term (x0_prev2, coefs (B, 7): 3M)
    "fp32": (torch.float32, torch.float32, False, False),
    "fp32-bf16-history": (torch.float32, torch.bfloat16, False, False),
    "fp32-channels-last": (torch.float32, torch.float32, True, False),
    "bf16": (torch.bfloat16, torch.bfloat16, False, False),
    "fp32-second-history-channels-last": (torch.float32, torch.float32, True, True),
    "bf16-second-history": (torch.bfloat16, torch.bfloat16, False, True),
}


@pytest.mark.parametrize("backend", TRITON_ONLY)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("case", MULTISTEP_CASES.values(), ids=MULTISTEP_CASES.keys())
def test_multistep_outputs_x0_and_y_prev(backend, case, clip):
    """x0 is this step's clamped estimate and y_prev the multistep update (given noise), both in
    y_t's dtype and layout, against float64 from the same stored inputs. A NaN in eps stays NaN
    in both outputs through the clip, as with torch.clamp. Shape (3, 3, 33, 47): two blocks per
    sample with a ragged tail. Bounds: the module docstring; bf16 outputs add the final store's
    rounding (as in test_random_shapes). A second history term adds one product and one sum,
    so one eps32·M' more."""
    dtype, history_dtype, channels_last, second = case
    shape = (3, 3, 33, 47)
    y, eps, z, x0_prev, coefs = _history_inputs(shape, seed=200, dtype=dtype)
    x0_prev = x0_prev.to(history_dtype)
    x0_prev2 = None
    if second:
        x0_prev2 = (2 * torch.rand(shape, generator=_generator(203, "cpu")) - 1).to(DEVICE, history_dtype)
        m3 = 2 * torch.rand(shape[0], 1, generator=_generator(204, "cpu"))
        coefs = torch.cat([coefs, m3.to(DEVICE)], dim=1)
    eps.view(3, -1)[1, 5] = float("nan")
    if channels_last:
        y, eps, z = (t.contiguous(memory_format=torch.channels_last) for t in (y, eps, z))
    y_prev, x0 = _triton_step(y, eps, coefs, noise=z, clip=clip, x0_prev=x0_prev, x0_prev2=x0_prev2)
    for name, out in (("y_prev", y_prev), ("x0", x0)):
        assert out.dtype == dtype and out.shape == y.shape and out.stride() == y.stride(), name

    expected_y, expected_x0, products = _multistep_float64(y, eps, z, coefs, x0_prev, clip, x0_prev2)
    nan = expected_x0.isnan()
    assert nan.sum() == 1 and torch.equal(x0.isnan(), nan) and torch.equal(y_prev.isnan(), nan)
    x0_error = (EPS32 + EPS32**2 / 4) * products + torch.finfo(torch.float32).tiny
    magnitudes = _magnitudes_history(y, eps, z, coefs[:, :6], x0_prev)
    if second:
        magnitudes = magnitudes + (coefs[:, 6].double().reshape(3, 1, 1, 1) * x0_prev2.double()).abs()
    y_error = (7 if second else 6) * EPS32 * magnitudes
    store = 0.0 if dtype == torch.float32 else (
        _bf16_store_rounding_ulps(backend) * torch.finfo(dtype).eps)
    for name, actual, expected, error in (("x0", x0, expected_x0, x0_error),
                                          ("y_prev", y_prev, expected_y, y_error)):
        actual, expected, error = actual.double()[~nan], expected[~nan], error[~nan]
        report(f"{backend} {name} clip={clip}", actual, expected)
        bound = store * (expected.abs() + error) + error
        excess = ((actual - expected).abs() - bound).max().item()
        assert excess <= 0, f"{name}: exceeds its bound by {excess:.3e}"
    if clip is not None:
        assert x0.double()[~nan].abs().max().item() <= clip


@pytest.mark.parametrize("backend", TRITON_ONLY)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_multistep_draws_the_single_step_noise(backend, clip):
    """One generator state gives the same in-kernel z with and without history:
      - a zero history changes nothing, bit for bit: m2·0 is an exact zero, and adding it leaves
        the partial sum as it was, so the remaining operations are the single-step op's own;
      - with a history, y_prev(history) − y_prev(single-step) is m2·x0_prev up to the two
        evaluations' errors, 3·eps32·M' + 3·eps32·M <= 6·eps32·M' (module docstring), where a
        different z would differ by sigma·(z − z'), far above that: checked with another seed.
    The single-step op reads the (B, 6) table's first five columns."""
    shape = (2, 3, 33, 47)
    y, eps, _, x0_prev, coefs = _history_inputs(shape, seed=210)
    single = _triton_step(y, eps, coefs, clip=clip, generator=_generator(5))
    zero_history, _ = _triton_step(y, eps, coefs, clip=clip, generator=_generator(5),
                                   x0_prev=torch.zeros_like(y))
    assert torch.equal(zero_history, single)

    with_history, x0 = _triton_step(y, eps, coefs, clip=clip, generator=_generator(5),
                                    x0_prev=x0_prev)
    m2 = coefs[:, 5].double().reshape(2, 1, 1, 1)
    history_term = m2 * x0_prev.double()  # exact: a product of two fp32 values in float64
    # M' needs |z|: the kernel's Box-Muller radius is at most sqrt(-2 ln 1e-7) = 5.678 (its
    # uniform is clamped at 1e-7), 5.7 with the rounding of log and sqrt.
    z_max = torch.full_like(y, 5.7)
    bound = 6 * EPS32 * _magnitudes_history(y, eps, z_max, coefs, x0_prev) + torch.finfo(
        torch.float32).tiny
    difference = with_history.double() - single.double()
    report(f"{backend} history - single-step vs m2·x0_prev", difference, history_term)
    assert ((difference - history_term).abs() <= bound).all()

    other_seed, _ = _triton_step(y, eps, coefs, clip=clip, generator=_generator(6),
                                 x0_prev=x0_prev)
    beyond = ((other_seed.double() - single.double() - history_term).abs() > bound)
    assert beyond.double().mean().item() > 0.99  # the check above would see another z


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_single_step_op_reads_five_columns_of_six(backend):
    """sr3fast::reverse_step_triton accepts the (B, 6) table and ignores m2: bit for bit the
    (B, 5) result (both with given noise and with the same generator state)."""
    y, eps, z, _, coefs = _history_inputs((2, 3, 5, 7), seed=220)
    assert torch.equal(_triton_step(y, eps, coefs, noise=z, clip=1.0),
                       _triton_step(y, eps, coefs[:, :5].contiguous(), noise=z, clip=1.0))
    assert torch.equal(_triton_step(y, eps, coefs, generator=_generator(3)),
                       _triton_step(y, eps, coefs[:, :5].contiguous(), generator=_generator(3)))


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_multistep_rejects_five_column_coefs(backend):
    y, eps, z, x0_prev, coefs = _history_inputs((2, 3, 5, 7), seed=230)
    with pytest.raises(ValueError, match=r"\(B, 6\).*m2.*x0_prev"):
        _triton_step(y, eps, coefs[:, :5], noise=z, x0_prev=x0_prev)


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_multistep_gradient_raises_clear_error(backend):
    """The multistep op has no backward (samplers run without gradients); asking for one says so
    and names the backend that differentiates."""
    y, eps, z, x0_prev, coefs = _history_inputs((2, 3, 4, 4), seed=240)
    y_prev, x0 = _triton_step(y.requires_grad_(), eps, coefs, noise=z, x0_prev=x0_prev)
    with pytest.raises(NotImplementedError, match=r"no gradient.*backend\('reference'\)"):
        (y_prev.sum() + x0.sum()).backward()


def _multistep_op_args(noise_given: bool):
    from sr3fast.ops.triton.reverse_step import draw_seed
    y, eps, z, x0_prev, coefs = _history_inputs((2, 3, 5, 7), seed=250)
    if noise_given:
        return (y, eps, coefs, x0_prev, z, None, 1.0)
    return (y, eps, coefs, x0_prev, None, draw_seed(DEVICE, _generator(0)), None)


@pytest.mark.parametrize("backend", TRITON_ONLY)
@pytest.mark.parametrize("checks", OPCHECKS)
@pytest.mark.parametrize("noise_given", [True, False], ids=["noise", "seed"])
def test_multistep_opcheck(backend, checks, noise_given):
    args = _multistep_op_args(noise_given)
    args[0].requires_grad_()  # exercises the autograd registration
    torch.library.opcheck(torch.ops.sr3fast.reverse_step_multistep_triton.default, args,
                          test_utils=checks)
