"""reverse_step with the multistep history terms, on every backend:

    x0     = clamp(a·y_t − b·eps)
    y_prev = m0·x0 + m1·y_t + m2·x0_prev + sigma·z                   (depth 1: DPM-Solver++ 2M)
    y_prev = m0·x0 + m1·y_t + m2·x0_prev + m3·x0_prev2 + sigma·z     (depth 2: 3M)

returns (y_prev, x0). Checked at both depths: the reference against the formula written out in
float64; every fast backend against the reference (fp32 bound derived as in
tests/test_reverse_step.py, with the history terms added to the magnitudes involved); x0 is the
clamped estimate the next step needs; each history term is per sample, exact in its coefficient
and reads its own tensor; a zero coefficient or a zero history gives the shallower result;
in-kernel noise is the same draw at every depth; reduced precision by DESIGN.md's three-way
rule; argument errors.
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
DEPTHS = pytest.mark.parametrize("depth", [1, 2], ids=["x0_prev", "x0_prev2"])
# Roundings along any evaluation path of y_prev: x0 (two), then one per term added: 4 at depth 1
# and 5 at depth 2, each path within that many eps32·M of the exact value, so two paths (with and
# without FMA contraction) differ by at most twice as many.
ULPS = {1: 8, 2: 10}


def _generator(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _coefs(batch: int, seed: int) -> torch.Tensor:
    """(B, 7), different per sample, in the ranges DPM-Solver++ 2M/3M tables hold: a, b up to
    ~10, m0 up to ~4, m2 down to ~-3 and m3 up to ~2 where the step sizes change fast."""
    g = _generator(seed)
    lo = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, -3.0, 0.0])
    hi = torch.tensor([10.0, 10.0, 4.0, 1.0, 0.5, 0.0, 2.0])
    return (lo + (hi - lo) * torch.rand(batch, 7, generator=g)).to(DEVICE)


def _inputs(shape, seed: int, dtype=torch.float32):
    """y_t, eps, z ~ N(0, 1); x0_prev, x0_prev2 within [-1, 1] as clipped estimates are (and
    different, so a term reading the wrong one shows); coefs (B, 7)."""
    g = _generator(seed)
    y, eps, z = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(3))
    h, h2 = ((torch.rand(shape, generator=g) * 2 - 1).to(DEVICE, dtype) for _ in range(2))
    return y, eps, z, h, h2, _coefs(shape[0], seed + 1)


def _history(depth: int, h, h2) -> dict:
    """The op's keyword arguments of a history `depth` deep."""
    return {"x0_prev": h, "x0_prev2": h2 if depth == 2 else None}


def _per_sample(coefs, like):
    return coefs.double().reshape(coefs.shape[0], coefs.shape[1], *([1] * (like.dim() - 1))).unbind(dim=1)


def _magnitudes(y, eps, z, h, h2, coefs, depth) -> torch.Tensor:
    """M = |m0|(|a y| + |b eps|) + |m1 y| + |m2 x0_prev| [+ |m3 x0_prev2|] + |sigma z|, float64."""
    a, b, m0, m1, sigma, m2, m3 = _per_sample(coefs, y)
    y, eps, z, h, h2 = (t.double() for t in (y, eps, z, h, h2))
    m = (m0.abs() * ((a * y).abs() + (b * eps).abs()) + (m1 * y).abs() + (m2 * h).abs()
         + (sigma * z).abs())
    return m + (m3 * h2).abs() if depth == 2 else m


def _assert_fp32_close(name, actual, expected, magnitudes, ulps):
    """Within ulps·eps32·M of the other evaluation, plus one fp32 `tiny` for a flushed
    subnormal (see ULPS)."""
    report(name, actual, expected)
    bound = ulps * EPS32 * magnitudes.to(actual.device) + TINY32
    excess = (actual.double() - expected.double()).abs() - bound
    assert excess.max().item() <= 0, f"{name}: exceeds {ulps}·eps32·M by {excess.max().item():.3e}"


def _fast(backend, *args, **kwargs):
    with sr3fast.backend(backend):
        return ops.reverse_step(*args, **kwargs)


# ------------------------------------------------------------------ the reference itself

@DEPTHS
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_reference_matches_formula_float64(depth, clip):
    y, eps, z, h, h2, coefs = _inputs((2, 3, 6, 5), seed=1)
    y_prev, x0 = reference.reverse_step(y, eps, coefs, noise=z, clip=clip, **_history(depth, h, h2))
    a, b, m0, m1, sigma, m2, m3 = _per_sample(coefs, y)
    want_x0 = a * y.double() - b * eps.double()
    if clip is not None:
        want_x0 = want_x0.clamp(-clip, clip)
    want = m0 * want_x0 + m1 * y.double() + m2 * h.double() + sigma * z.double()
    if depth == 2:
        want = want + m3 * h2.double()
    _assert_fp32_close("x0", x0, want_x0, (a * y.double()).abs() + (b * eps.double()).abs(), 2)
    _assert_fp32_close("y_prev", y_prev, want, _magnitudes(y, eps, z, h, h2, coefs, depth),
                       ULPS[depth])
    if clip is not None:
        assert x0.abs().max().item() <= clip


def test_reference_zero_history_is_the_shallower_update():
    """No x0_prev is a zero history: the m2, m3 columns are unused, the result is the 5-column
    op's; likewise a zero x0_prev2 gives the depth-1 result."""
    y, eps, z, h, _, coefs = _inputs((2, 3, 6, 5), seed=2)
    single = reference.reverse_step(y, eps, coefs[:, :5], noise=z, clip=1.0)
    assert torch.equal(reference.reverse_step(y, eps, coefs, noise=z, clip=1.0), single)
    with_zero_history, _ = reference.reverse_step(y, eps, coefs, noise=z, clip=1.0,
                                                  x0_prev=torch.zeros_like(y))
    torch.testing.assert_close(with_zero_history, single, rtol=0, atol=0)
    depth1, _ = reference.reverse_step(y, eps, coefs, noise=z, clip=1.0, x0_prev=h)
    with_zero_second, _ = reference.reverse_step(y, eps, coefs, noise=z, clip=1.0, x0_prev=h,
                                                 x0_prev2=torch.zeros_like(y))
    torch.testing.assert_close(with_zero_second, depth1, rtol=0, atol=0)


# ------------------------------------------------------------------ fast backends

@pytest.mark.parametrize("backend", BACKENDS)
@DEPTHS
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_given_noise_matches_reference_fp32(backend, depth, shape, clip):
    y, eps, z, h, h2, coefs = _inputs(shape, seed=10)
    history = _history(depth, h, h2)
    want_y, want_x0 = reference.reverse_step(y, eps, coefs, noise=z, clip=clip, **history)
    got_y, got_x0 = _fast(backend, y, eps, coefs, noise=z, clip=clip, **history)
    assert got_y.shape == y.shape and got_y.dtype == y.dtype
    assert got_x0.shape == y.shape and got_x0.dtype == y.dtype
    _assert_fp32_close(f"{backend} y_prev", got_y, want_y,
                       _magnitudes(y, eps, z, h, h2, coefs, depth), ULPS[depth])
    a, b = (c.double() for c in _per_sample(coefs, y)[:2])
    _assert_fp32_close(f"{backend} x0", got_x0, want_x0,
                       (a * y.double()).abs() + (b * eps.double()).abs(), ulps=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("column", [5, 6], ids=["m2", "m3"])
def test_history_term_is_per_sample_exact_and_reads_its_own_tensor(backend, column):
    """Changing only sample 1's m2 (m3) by 1e-3 moves only sample 1's y_prev, by 1e-3·x0_prev
    (1e-3·x0_prev2): catches a kernel that reads the coefficient from the wrong column or
    sample, applies it to the other history tensor, or drops the term."""
    y, eps, z, h, h2, coefs = _inputs((3, 3, 9, 11), seed=20)
    base, _ = _fast(backend, y, eps, coefs, noise=z, clip=1.0, x0_prev=h, x0_prev2=h2)
    nudged = coefs.clone()
    nudged[1, column] += 1e-3
    moved, _ = _fast(backend, y, eps, nudged, noise=z, clip=1.0, x0_prev=h, x0_prev2=h2)
    assert torch.equal(moved[0], base[0]) and torch.equal(moved[2], base[2])
    expected_shift = 1e-3 * (h if column == 5 else h2)[1].double()
    bound = ULPS[2] * EPS32 * _magnitudes(y, eps, z, h, h2, nudged, 2)[1] + TINY32
    assert ((moved[1].double() - base[1].double()) - expected_shift).abs().le(bound).all()
    assert (moved[1] - base[1]).abs().max().item() > 5e-4      # the term is really there


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_coefficients_equal_the_shallower_update(backend):
    """m3 = 0: the depth-2 result equals the depth-1 op's on the same inputs; m2 = 0 as well:
    the single-step op's (same backend)."""
    y, eps, z, h, h2, coefs = _inputs((2, 4, 13, 7), seed=30)
    coefs[:, 6] = 0
    got, _ = _fast(backend, y, eps, coefs, noise=z, clip=1.0, x0_prev=h, x0_prev2=h2)
    depth1, _ = _fast(backend, y, eps, coefs[:, :6].contiguous(), noise=z, clip=1.0, x0_prev=h)
    _assert_fp32_close(f"{backend} m3=0", got, depth1, _magnitudes(y, eps, z, h, h2, coefs, 2),
                       ULPS[2])
    coefs[:, 5] = 0
    got, _ = _fast(backend, y, eps, coefs[:, :6].contiguous(), noise=z, clip=1.0, x0_prev=h)
    single = _fast(backend, y, eps, coefs[:, :5].contiguous(), noise=z, clip=1.0)
    _assert_fp32_close(f"{backend} m2=0", got, single, _magnitudes(y, eps, z, h, h2, coefs, 1),
                       ULPS[1])


@pytest.mark.parametrize("backend", BACKENDS)
@DEPTHS
def test_channels_last(backend, depth):
    y, eps, z, h, h2, coefs = _inputs((2, 4, 6, 10), seed=40)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (y, eps, z, h, h2)]
    got_y, got_x0 = _fast(backend, cl[0], cl[1], coefs, noise=cl[2], clip=None,
                          **_history(depth, cl[3], cl[4]))
    want_y, want_x0 = reference.reverse_step(y, eps, coefs, noise=z, **_history(depth, h, h2))
    _assert_fp32_close(f"{backend} cl", got_y, want_y, _magnitudes(y, eps, z, h, h2, coefs, depth),
                       ULPS[depth])
    torch.testing.assert_close(got_x0, want_x0, rtol=4 * EPS32, atol=TINY32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_noise_is_the_single_step_draw(backend):
    """Without `noise`, the op draws z from the generator; at every history depth it must draw
    the same z (so switching samplers does not change the noise stream). sigma = 1 and every
    other coefficient 0 make y_prev = z exactly."""
    y, eps, _, h, h2, _ = _inputs((2, 3, 17, 9), seed=50)
    coefs = torch.zeros(2, 7, device=DEVICE)
    coefs[:, 4] = 1.0
    without = _fast(backend, y, eps, coefs, clip=None, generator=_generator(7, DEVICE))
    for depth in (1, 2):
        with_history, _ = _fast(backend, y, eps, coefs, clip=None, **_history(depth, h, h2),
                                generator=_generator(7, DEVICE))
        assert torch.equal(with_history, without), depth
    assert without.std().item() > 0.5              # it is noise, not zeros


@pytest.mark.parametrize("backend", BACKENDS)
@DEPTHS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_within_baseline(backend, depth, dtype):
    y, eps, z, h, h2, coefs = _inputs((3, 3, 17, 19), seed=60, dtype=dtype)
    history = _history(depth, h, h2)
    want_y, _ = reference.reverse_step(
        y.float(), eps.float(), coefs, noise=z.float(), clip=1.0,
        **{k: None if v is None else v.float() for k, v in history.items()})
    got_y, got_x0 = _fast(backend, y, eps, coefs, noise=z, clip=1.0, **history)
    assert got_y.dtype == dtype and got_x0.dtype == dtype
    a, b, m0, m1, sigma, m2, m3 = coefs.to(dtype).reshape(3, 7, 1, 1, 1).unbind(dim=1)
    x0 = (a * y - b * eps).clamp(-1, 1)
    baseline = m0 * x0 + m1 * y + m2 * h + sigma * z
    if depth == 2:
        baseline = baseline + m3 * h2
    atol = fp32_atol(1, _magnitudes(y, eps, z, h, h2, coefs, depth).max().item())
    assert_within_baseline(f"{backend} {dtype}", got_y, want_y, baseline, atol)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("bad, match", [
    ("five-columns", "m2 column"),
    ("six-columns-with-x0_prev2", "m3 column"),
    ("x0-shape", "x0_prev"),
    ("x0_prev2-shape", "x0_prev2"),
    ("x0_prev2-alone", "needs x0_prev"),
    ("x0_prev2-dtype", "x0_prev's dtype"),
])
def test_bad_arguments_raise_clearly(bad, match):
    y, eps, z, h, h2, coefs = _inputs((2, 3, 4, 4), seed=70)
    history = {"x0_prev": h}
    if bad == "five-columns":
        coefs = coefs[:, :5]
    elif bad == "six-columns-with-x0_prev2":
        coefs, history["x0_prev2"] = coefs[:, :6], h2
    elif bad == "x0-shape":
        history["x0_prev"] = h[:, :2]
    elif bad == "x0_prev2-shape":
        history["x0_prev2"] = h2[:, :2]
    elif bad == "x0_prev2-alone":
        history = {"x0_prev2": h2}
    else:
        history["x0_prev2"] = h2.double()
    with pytest.raises(ValueError, match=match):
        ops.reverse_step(y, eps, coefs, noise=z, **history)
