"""sr3fast.diffusion: schedules, Algorithm 1 loss, samplers — against formulas written out here.

Expected values are computed independently (numpy / float64 closed forms), never by calling
the code under test a second way. Tolerances come from the float32/float64 rounding of the
operations involved (see `step_bound`), not from tuning.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sr3fast import ops, reference
from sr3fast.diffusion import (SAMPLER_NAMES, SAMPLERS, SCHEDULES, NoiseSchedule, diffusion_loss,
                               make_betas, noise_levels, respace, reverse_coefficients, sample,
                               sample_ddim, sample_gamma, sample_posterior, sample_sr3)
from sr3fast.diffusion import samplers as samplers_module

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
# The schedule of the public SR3 checkpoints (sr_sr3_16_128.json, "train" and "val").
PUBLIC_CONFIG = {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 1e-2}


# ----------------------------------------------------------------------------- helpers

def public_betas(name: str, n: int, start: float, end: float, s: float = 8e-3) -> np.ndarray:
    """The public code's make_beta_schedule, written out element by element."""
    k = np.arange(n, dtype=np.float64)
    if name == "linear":
        return start + (end - start) * k / max(n - 1, 1)
    if name == "quad":
        return (start ** 0.5 + (end ** 0.5 - start ** 0.5) * k / max(n - 1, 1)) ** 2
    if name in ("warmup10", "warmup50"):
        warm = int(n * (0.1 if name == "warmup10" else 0.5))
        ramp = start + (end - start) * k / max(warm - 1, 1)
        return np.where(k < warm, ramp, end)
    if name == "const":
        return np.full(n, end)
    if name == "jsd":
        return 1.0 / (n - k)
    if name == "cosine":
        f = np.cos((np.arange(n + 1) / n + s) / (1 + s) * np.pi / 2) ** 2
        return np.minimum(1 - f[1:] / f[:-1], 0.999)
    raise AssertionError(name)


def public_tables(betas: np.ndarray) -> dict:
    """The buffers of the public GaussianDiffusion.set_new_noise_schedule, in float64."""
    alphas = 1 - betas
    cumprod = np.cumprod(alphas)
    prev = np.append(1.0, cumprod[:-1])
    variance = betas * (1 - prev) / (1 - cumprod)
    return {
        "sqrt_recip": np.sqrt(1 / cumprod),
        "sqrt_recipm1": np.sqrt(1 / cumprod - 1),
        "variance": variance,
        "log_variance": np.log(np.maximum(variance, 1e-20)),
        "coef1": betas * np.sqrt(prev) / (1 - cumprod),
        "coef2": (1 - prev) * np.sqrt(alphas) / (1 - cumprod),
    }


def step_bound(coefs: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on the float32 rounding of one reverse_step against exact maths.

    x0 = a·y - b·eps and y' = m0·x0 + m1·y + sigma·z: each coefficient is rounded to float32
    once and each product and sum once more, every rounding at most eps32/2 relative to the
    term it touches; no path through the update has more than six of them, so
    |error| <= 3·eps32·(m0·(|a·y| + |b·eps|) + |m1·y| + |sigma·z|). We allow 4·eps32.
    """
    a, b, m0, m1, sigma = (c.double().view(-1, 1, 1, 1).abs() for c in coefs.unbind(1)[:5])
    y, eps, z = y.double().abs(), eps.double().abs(), z.double().abs()
    return 4 * EPS32 * (m0 * (a * y + b * eps) + m1 * y + sigma * z)


class TinyModel(nn.Module):
    """Stand-in for the SR3 U-Net: a 3x3 conv over [x, y_t] plus a bias linear in gamma."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(6, 3, 3, padding=1)
        self.level = nn.Linear(1, 3)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))

    def predict_noise(self, x, y_t, gamma):
        return self.conv(torch.cat([x, y_t], dim=1)) + self.level(gamma[:, None].to(x.dtype))[..., None, None]


class NoiseOracle(nn.Module):
    """Knows y_0, so returns the true noise in y_t: (y_t - sqrt(g) y_0)/sqrt(1 - g), in float64.

    It looks the level up in the float64 table (the float32 gamma it is told rounds 1 - g
    badly near g = 1) and checks that the gamma it was told is that level.
    """

    def __init__(self, y0: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        self.y0, self.levels = y0.double(), schedule.gammas
        self.told, self.last_eps = [], None

    def predict_noise(self, x, y_t, gamma):
        self.told.append(gamma)
        index = (self.levels - gamma[0].double()).abs().argmin()
        g = self.levels[index]
        assert torch.allclose(gamma.double(), g.expand_as(gamma), rtol=EPS32, atol=0)
        eps = (y_t.double() - g.sqrt() * self.y0) / (1 - g).sqrt()
        self.last_eps = eps.to(y_t.dtype)
        return self.last_eps


def images(seed: int, shape=(2, 3, 8, 8), scale: float = 0.9) -> torch.Tensor:
    """Data-like images: uniform in [-scale, scale]."""
    generator = torch.Generator().manual_seed(seed)
    return scale * (2 * torch.rand(shape, generator=generator) - 1)


@pytest.fixture(scope="module")
def public_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(PUBLIC_CONFIG)


# ----------------------------------------------------------------------------- schedules

# "lambda" is sr3fast's own inference family (no public formula; tests/test_schedule_search.py).
@pytest.mark.parametrize("name", [name for name in SCHEDULES if name != "lambda"])
@pytest.mark.parametrize("n", [1, 7, 2000])
def test_named_schedules_match_public_formulas(name, n):
    start, end = 1e-6, 1e-2
    betas = make_betas(name, n, linear_start=start, linear_end=end)
    expected = public_betas(name, n, start, end)
    assert betas.dtype == torch.float64 and betas.shape == (n,)
    # linspace vs closed form differ by a few ulps; cos² of the cosine schedule near pi/2 loses
    # relative precision in 1 - f[t]/f[t-1], up to eps64/(1 - ratio) with ratio <= 1 - 1e-5.
    rtol = 64 * EPS64 if name != "cosine" else 64 * EPS64 / 1e-5
    np.testing.assert_allclose(betas.numpy(), expected, rtol=rtol, atol=0)


def test_linear_endpoints_and_gammas_are_cumulative_products():
    betas = make_betas("linear", 2000, linear_start=1e-6, linear_end=1e-2)
    assert betas[0].item() == pytest.approx(1e-6, rel=4 * EPS64)
    assert betas[-1].item() == pytest.approx(1e-2, rel=4 * EPS64)
    schedule = NoiseSchedule(betas)
    product, expected = 1.0, []
    for b in betas.tolist():
        product *= 1 - b
        expected.append(product)
    np.testing.assert_allclose(schedule.gammas.numpy(), expected, rtol=2000 * EPS64)
    np.testing.assert_array_equal(schedule.gammas_prev.numpy(), [1.0, *expected[:-1]])
    np.testing.assert_array_equal(schedule.alphas.numpy(), 1 - betas.numpy())


def test_jsd_reaches_zero_level_with_finite_tables():
    schedule = NoiseSchedule(make_betas("jsd", 10))
    assert schedule.betas[-1].item() == 1.0 and schedule.gammas[-1].item() == 0.0
    # g_t = prod_{i<=t} (1 - 1/(T - i + 1)) = (T - t)/T
    np.testing.assert_allclose(schedule.gammas.numpy(), (10 - np.arange(1, 11)) / 10, atol=8 * EPS64)
    for name in ("posterior_variance", "posterior_log_variance", "posterior_mean_coef_x0",
                 "posterior_mean_coef_yt"):
        assert torch.isfinite(getattr(schedule, name)).all(), name
    # q(y_{T-1} | y_T, y_0) = q(y_{T-1} | y_0) when y_T is pure noise
    assert schedule.posterior_variance[-1].item() == pytest.approx(1 - schedule.gammas[-2].item())
    assert schedule.posterior_mean_coef_yt[-1].item() == 0.0
    gamma = sample_gamma(schedule, 64, torch.Generator().manual_seed(0))
    assert ((gamma >= 0) & (gamma <= 1)).all()
    with pytest.raises(ValueError, match="g_T = 0"):
        reverse_coefficients(schedule, "posterior", 1)
    # the advertised remedy works
    reverse_coefficients(NoiseSchedule(schedule.betas[:-1]), "posterior", 1)


def test_cosine_betas_are_clamped():
    schedule = NoiseSchedule(make_betas("cosine", 1000))
    assert schedule.betas.max().item() == 0.999 and schedule.betas[-1].item() == 0.999
    assert (schedule.gammas > 0).all() and (schedule.gammas.diff() < 0).all()


def test_posterior_tables_match_closed_forms(public_schedule):
    s = public_schedule
    expected = public_tables(s.betas.numpy())
    np.testing.assert_allclose(s.posterior_variance.numpy(), expected["variance"], rtol=64 * EPS64)
    np.testing.assert_allclose(s.posterior_log_variance.numpy(), expected["log_variance"], rtol=64 * EPS64)
    np.testing.assert_allclose(s.posterior_mean_coef_x0.numpy(), expected["coef1"], rtol=64 * EPS64)
    np.testing.assert_allclose(s.posterior_mean_coef_yt.numpy(), expected["coef2"], rtol=64 * EPS64)
    # the same variance by another route: 1/(1/(1 - g_{t-1}) + a_t/b_t), for t >= 2;
    # 1 - g_{t-1} ~ 1e-6 at t = 2 costs float64 digits: relative error ~ eps64/1e-6.
    b, g_prev = s.betas.numpy()[1:], s.gammas_prev.numpy()[1:]
    np.testing.assert_allclose(s.posterior_variance.numpy()[1:], 1 / (1 / (1 - g_prev) + (1 - b) / b),
                               rtol=64 * EPS64 / 1e-6)
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance[0].item() == pytest.approx(math.log(1e-20))


def test_explicit_betas_and_bad_input():
    betas = make_betas([0.1, 0.2, 0.5])
    assert betas.dtype == torch.float64 and betas.tolist() == [0.1, 0.2, 0.5]
    assert NoiseSchedule([0.1, 0.2, 0.5]).gammas[-1].item() == pytest.approx(0.9 * 0.8 * 0.5)
    with pytest.raises(ValueError, match="choose one of linear, quad"):
        make_betas("sigmoid", 10)
    with pytest.raises(ValueError, match="n_timestep must be a positive integer"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match=r"beta\[0\] = 0.0"):
        make_betas("linear", 10, linear_start=0.0)
    for bad in ([0.1, 1.5], [0.1, float("nan")], [0.1, -0.1]):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
            make_betas(bad)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        make_betas([[0.1, 0.2]])
    with pytest.raises(ValueError, match="3 betas were given"):
        make_betas([0.1, 0.2, 0.3], 4)


def test_from_config(public_schedule):
    np.testing.assert_array_equal(public_schedule.betas.numpy(),
                                  make_betas("linear", 2000, 1e-6, 1e-2).numpy())
    assert public_schedule.num_steps == len(public_schedule) == 2000
    with pytest.raises(ValueError, match=r"unknown keys \['n_steps'\]"):
        NoiseSchedule.from_config({**PUBLIC_CONFIG, "n_steps": 3})
    with pytest.raises(ValueError, match="'train' or 'val' entry"):
        NoiseSchedule.from_config({"train": PUBLIC_CONFIG, "val": PUBLIC_CONFIG})


@pytest.mark.parametrize("steps", [1, 2, 3, 50, 1999])
def test_respace_keeps_endpoints_and_is_monotone(public_schedule, steps):
    s = public_schedule
    r = respace(s, steps)
    assert r.num_steps == steps
    originals = s.gammas.numpy()
    # nearest original level: consecutive levels differ by >= 1e-6 relative, far above rounding
    index = np.array([np.argmin(np.abs(originals - g)) for g in r.gammas.numpy()])
    kept = originals[index]
    # Each kept level is an entry of the original table, re-derived through b = 1 - g_i/g_{i-1}
    # and g_i = g_{i-1}·(1 - b): each step rounds a few times relative to 1 and to the ratio
    # r = g_i/g_{i-1}, so the relative error grows by about eps64·(1 + 1/r) per step.
    ratio = kept / np.concatenate([[1.0], kept[:-1]])
    rtol = 4 * EPS64 * np.cumsum(1 + 1 / ratio)
    assert (np.abs(r.gammas.numpy() - kept) <= rtol * kept).all()
    assert index[-1] == 1999  # g_T is always kept
    if steps >= 2:  # so is g_1, and the kept indices are evenly spaced (gaps differ by <= 1)
        assert index[0] == 0 and np.ptp(np.diff(index)) <= 1
    assert (r.gammas.diff() < 0).all() and ((r.betas > 0) & (r.betas <= 1)).all()


def test_respace_bounds(public_schedule):
    assert respace(public_schedule, 2000) is public_schedule
    for bad in (0, 2001, 2.5, None):
        with pytest.raises(ValueError, match="from 1 to 2000"):
            respace(public_schedule, bad)


# ----------------------------------------------------------------------------- loss

def test_gamma_samples_land_in_their_intervals():
    schedule = NoiseSchedule(make_betas("linear", 20, 1e-3, 0.2))
    g = np.concatenate([[1.0], schedule.gammas.numpy()])
    gamma = sample_gamma(schedule, 4096, torch.Generator().manual_seed(3)).numpy()
    t = torch.randint(1, 21, (4096,), generator=torch.Generator().manual_seed(3)).numpy()
    assert set(t) == set(range(1, 21))  # every step drawn
    assert ((g[t] <= gamma) & (gamma <= g[t - 1])).all()

    gamma = sample_gamma(schedule, 4096, torch.Generator().manual_seed(4), method="public").numpy()
    (t,) = torch.randint(1, 21, (1,), generator=torch.Generator().manual_seed(4)).tolist()
    assert ((g[t] * (1 - 4 * EPS64) <= gamma) & (gamma <= g[t - 1] * (1 + 4 * EPS64))).all()
    # sqrt(g), not g, is uniform there: its mean is the interval's midpoint (4096 samples:
    # standard error of the mean = width/sqrt(12·4096) < width/200; allow 5 standard errors).
    low, high = g[t] ** 0.5, g[t - 1] ** 0.5
    assert abs(np.sqrt(gamma).mean() - (low + high) / 2) < 5 * (high - low) / 221


@pytest.mark.parametrize("loss", ["l1", "l2"])
@pytest.mark.parametrize("method", ["paper", "public"])
def test_loss_is_algorithm_1(loss, method):
    """The loss with a seeded generator equals Algorithm 1 computed by hand from the same draws:
    t, then u (sample_gamma's order), then the noise e."""
    schedule = NoiseSchedule(make_betas("linear", 50, 1e-4, 0.1))
    model = TinyModel().double()
    x, y0 = images(1).double(), images(2).double()
    actual = diffusion_loss(model, x, y0, schedule, loss=loss, gamma_method=method,
                            generator=torch.Generator().manual_seed(7))

    generator = torch.Generator().manual_seed(7)
    batch = y0.shape[0]
    t = torch.randint(1, 51, (batch if method == "paper" else 1,), generator=generator).numpy()
    u = torch.rand(batch, generator=generator, dtype=torch.float64).numpy()
    e = torch.randn(y0.shape, generator=generator, dtype=torch.float64)
    g = np.concatenate([[1.0], schedule.gammas.numpy()])
    if method == "paper":
        gamma = g[t - 1] - u * (g[t - 1] - g[t])
    else:
        gamma = (np.sqrt(g[t - 1]) - u * (np.sqrt(g[t - 1]) - np.sqrt(g[t]))) ** 2
    gamma = torch.from_numpy(gamma)
    y_noisy = gamma.sqrt().view(-1, 1, 1, 1) * y0 + (1 - gamma).sqrt().view(-1, 1, 1, 1) * e
    with torch.no_grad():
        residual = model.predict_noise(x, y_noisy, gamma) - e
    expected = residual.abs().mean() if loss == "l1" else residual.square().mean()
    # float64 throughout; the conv sums 54 terms per output, the mean 384 of them
    magnitude = (residual.abs().max() + 1) ** (1 if loss == "l1" else 2)
    assert actual.item() == pytest.approx(expected.item(), abs=64 * EPS64 * 54 * magnitude.item())


def test_loss_trains_the_model_and_rejects_bad_input(public_schedule):
    model = TinyModel()
    x, y0 = images(1), images(2)
    value = diffusion_loss(model, x, y0, public_schedule, generator=torch.Generator().manual_seed(0))
    assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # the device table is built once and reused
    assert public_schedule.gamma_table("cpu") is public_schedule.gamma_table(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown loss 'l3'"):
        diffusion_loss(model, x, y0, public_schedule, loss="l3")
    with pytest.raises(ValueError, match=r"gamma must have shape \(2,\)"):
        diffusion_loss(model, x, y0, public_schedule, gamma=torch.ones(3))
    with pytest.raises(ValueError, match="unknown method"):
        sample_gamma(public_schedule, 2, method="ddpm")


# ----------------------------------------------------------------------------- one step

def random_step_inputs(seed: int, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    y, eps, z = (torch.randn(batch, 3, 8, 8, generator=generator) for _ in range(3))
    return 1.5 * y, eps, z


@pytest.mark.parametrize("i", [0, 1000, 1999])
def test_sr3_step_is_algorithm_2(public_schedule, i):
    t = 2000 - i  # loop step i is diffusion step t
    coefs = reverse_coefficients(public_schedule, "sr3", 2)[i]
    y, eps, z = random_step_inputs(i)
    actual = reference.reverse_step(y, eps, coefs, noise=z)

    b = public_schedule.betas.numpy()[t - 1]
    g = np.prod(1 - public_schedule.betas.numpy()[:t])
    sigma = math.sqrt(b) if t > 1 else 0.0
    expected = (y.double() - b / math.sqrt(1 - g) * eps.double()) / math.sqrt(1 - b) + sigma * z.double()
    assert (actual.double() - expected).abs().le(step_bound(coefs, y, eps, z)).all()


@pytest.mark.parametrize("i", [0, 1000, 1999])
def test_posterior_step_is_public_p_sample(public_schedule, i):
    j = 2000 - 1 - i  # the public code's 0-based index of step t = j + 1
    coefs = reverse_coefficients(public_schedule, "posterior", 2)[i]
    y, eps, z = random_step_inputs(i)
    actual = reference.reverse_step(y, eps, coefs, noise=z, clip=1.0)

    p = {key: value[j] for key, value in public_tables(public_schedule.betas.numpy()).items()}
    x_recon = (p["sqrt_recip"] * y.double() - p["sqrt_recipm1"] * eps.double()).clamp(-1, 1)
    mean = p["coef1"] * x_recon + p["coef2"] * y.double()
    noise = z.double() if j > 0 else torch.zeros_like(mean)
    expected = mean + noise * math.exp(0.5 * p["log_variance"])
    assert (actual.double() - expected).abs().le(step_bound(coefs, y, eps, z)).all()
    if i == 0:  # make sure the clamp was exercised on both sides and not everywhere
        raw = p["sqrt_recip"] * y - p["sqrt_recipm1"] * eps
        assert (raw > 1).any() and (raw < -1).any() and (raw.abs() < 1).any()


@pytest.mark.parametrize("i", [0, 25, 49])
def test_ddim_step_is_song_eq_12(public_schedule, i):
    schedule = respace(public_schedule, 50)
    eta = 0.5
    coefs = reverse_coefficients(schedule, "ddim", 2, eta=eta)[i]
    y, eps, z = random_step_inputs(i)
    actual = reference.reverse_step(y, eps, coefs, noise=z)

    g = schedule.gammas.numpy()[49 - i]
    g_prev = schedule.gammas.numpy()[48 - i] if i < 49 else 1.0
    sigma = eta * math.sqrt((1 - g_prev) / (1 - g) * (1 - g / g_prev))
    x0 = (y.double() - math.sqrt(1 - g) * eps.double()) / math.sqrt(g)
    expected = (math.sqrt(g_prev) * x0 + math.sqrt(1 - g_prev - sigma ** 2) * eps.double()
                + sigma * z.double())
    assert (actual.double() - expected).abs().le(step_bound(coefs, y, eps, z)).all()


def test_ddim_with_eta_one_is_the_posterior(public_schedule):
    ddim = reverse_coefficients(public_schedule, "ddim", 1, eta=1.0)
    posterior = reverse_coefficients(public_schedule, "posterior", 1)
    # same maths by different formulas: float64 agreement, then one float32 rounding each
    torch.testing.assert_close(ddim, posterior, rtol=2 * EPS32, atol=1e-12)


# ----------------------------------------------------------------------------- tables

@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_tables_layout(public_schedule, sampler):
    schedule = respace(public_schedule, 10)
    coefs = reverse_coefficients(schedule, sampler, 3)
    gammas = noise_levels(schedule, 3, "cpu")
    assert coefs.shape == (10, 3, 7) and coefs.dtype == torch.float32 and coefs.is_contiguous()
    assert gammas.shape == (10, 3) and gammas.dtype == torch.float32 and gammas.is_contiguous()
    assert (coefs == coefs[:, :1]).all() and (gammas == gammas[:, :1]).all()  # same for every sample
    g_T = schedule.gammas[-1].item()
    assert gammas[0, 0].item() == pytest.approx(g_T, rel=EPS32)  # row 0 is step T
    assert coefs[0, 0, 0].item() == pytest.approx(g_T ** -0.5, rel=EPS32)
    assert coefs[-1, 0, 2:].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # t = 1: y_0 is the x0 estimate
    assert coefs[0, 0, 5:].tolist() == [0.0, 0.0]            # step T: no history yet
    assert coefs[1, 0, 6].item() == 0.0                      # step T - 1: one step of history


def test_sampler_builds_each_table_once_and_steps_through_views(public_schedule, monkeypatch):
    schedule = respace(public_schedule, 8)
    built, steps = {}, []

    def counted(function):
        def wrapper(*args, **kwargs):
            table = function(*args, **kwargs)
            built.setdefault(function.__name__, []).append(table)
            return table
        return wrapper

    def recording_step(y_t, eps, coefs, noise=None, clip=None, generator=None):
        steps.append(coefs)
        return reference.reverse_step(y_t, eps, coefs, noise, clip, generator)

    monkeypatch.setattr(samplers_module, "reverse_coefficients", counted(reverse_coefficients))
    monkeypatch.setattr(samplers_module, "noise_levels", counted(noise_levels))
    monkeypatch.setattr(ops, "reverse_step", recording_step)
    model = NoiseOracle(images(0), schedule)
    sample_posterior(model, images(1), schedule, generator=torch.Generator().manual_seed(0))

    (coefs,), (gammas,) = built["reverse_coefficients"], built["noise_levels"]
    assert len(steps) == len(model.told) == 8
    for i, (row, told) in enumerate(zip(steps, model.told)):
        assert row.dtype == torch.float32 and row.device == coefs.device
        assert row.data_ptr() == coefs[i].data_ptr()  # a view of the table: nothing rebuilt
        assert told.data_ptr() == gammas[i].data_ptr()


# ----------------------------------------------------------------------------- full runs

def reconstruction_bound(schedule: NoiseSchedule, y_1: torch.Tensor, eps_1: torch.Tensor,
                         y0: torch.Tensor) -> float:
    """The last step returns x0 = a·y_1 - b·eps_1 (m0 = 1, m1 = sigma = 0), exactly y_0 for the
    oracle's eps: its error is that step's float32 rounding (step_bound, plus eps_1's own
    rounding to float32). Earlier steps' rounding does not reach it: the oracle's eps is
    computed from whatever y_1 they produced."""
    g = schedule.gammas[0].item()
    a, b = g ** -0.5, (1 / g - 1) ** 0.5
    return (4 * EPS32 * (a * y_1.abs() + b * eps_1.abs() + y0.abs())).max().item()


@pytest.mark.parametrize("sampler, steps", [("sr3", 2000), ("posterior", 2000), ("sr3", 50),
                                            ("posterior", 50), ("ddim", 50), ("dpmpp_2m", 20),
                                            ("dpmpp_2m_sde", 20)])
def test_oracle_model_reconstructs_y0(public_schedule, sampler, steps):
    schedule = respace(public_schedule, steps)
    y0 = images(5)
    oracle = NoiseOracle(y0, schedule)
    seen = {}

    def keep_y_1(i, y):
        if i == steps - 2:
            seen["y_1"] = y
    result = SAMPLERS[sampler](oracle, images(6), schedule, generator=torch.Generator().manual_seed(0),
                               callback=keep_y_1)
    assert result.dtype == torch.float32 and result.shape == y0.shape
    bound = reconstruction_bound(schedule, seen["y_1"], oracle.last_eps, y0)
    error = (result - y0).abs().max().item()
    print(f"{sampler} {steps} steps: max |y - y0| = {error:.3e} (bound {bound:.3e})")
    assert error <= bound


def test_ddim_eta_zero_is_deterministic_given_y_T(public_schedule):
    schedule = respace(public_schedule, 20)
    model, x = TinyModel(), images(1)
    y_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    first = sample_ddim(model, x, schedule, y_T=y_T, generator=torch.Generator().manual_seed(1))
    second = sample_ddim(model, x, schedule, y_T=y_T, generator=torch.Generator().manual_seed(2),
                         noise="kernel")
    assert torch.equal(first, second)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("noise", ["torch", "kernel"])
def test_same_seed_same_sample(public_schedule, sampler, noise):
    schedule = respace(public_schedule, 10)
    model, x = TinyModel(), images(1)
    kwargs = {"noise": noise, **({"eta": 0.7} if sampler == "ddim" else {})}
    run = lambda seed: sample(sampler, model, x, schedule, generator=torch.Generator().manual_seed(seed),
                              **kwargs)
    first, again, other = run(0), run(0), run(1)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_sampler_interface(public_schedule, capsys):
    schedule = respace(public_schedule, 5)
    model, x = TinyModel().double(), images(1)
    calls = []
    out = sample("sr3", model, x.double(), schedule, generator=torch.Generator().manual_seed(0),
                 callback=lambda i, y: calls.append((i, tuple(y.shape))), progress=True)
    assert out.dtype == torch.float32  # the state stays float32 whatever the model's dtype
    assert calls == [(i, tuple(x.shape)) for i in range(5)]
    assert "5/5" in capsys.readouterr().err  # the progress bar ran to the end
    assert set(SAMPLERS) == set(SAMPLER_NAMES)
    with pytest.raises(ValueError, match="choose one of sr3, posterior, ddim"):
        sample("euler", model, x, schedule)
    with pytest.raises(ValueError, match="noise must be one of"):
        sample_sr3(model, x, schedule, noise="numpy")
    with pytest.raises(ValueError, match="y_T must match x"):
        sample_sr3(model, x, schedule, y_T=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        sample_ddim(model, x, schedule, eta=1.5)
    with pytest.raises(TypeError, match="NoiseSchedule.from_config"):
        sample_sr3(model, x, PUBLIC_CONFIG)


# ----------------------------------------------------------------------------- the chain, in order

def expected_step(sampler: str, g: float, g_prev: float, eta: float = 0.0) -> tuple[float, ...]:
    """(a, b, m0, m1, sigma) of the step from level g = g_t down to g_prev = g_{t-1} (1 at t = 1),
    from the samplers' formulas in float64 (written out independently of coefficients.py):
    x0 = a·y - b·eps = y/sqrt(g) - sqrt(1/g - 1)·eps for all three, then

      sr3, posterior  mean = sqrt(g_prev)·beta/(1 - g)·x0 + sqrt(alpha)(1 - g_prev)/(1 - g)·y
                      (Algorithm 2's mean with eps written through x0), alpha = g/g_prev;
                      sigma = sqrt(beta) (sr3) or sqrt((1 - g_prev)·beta/(1 - g)) (posterior)
      ddim            y' = sqrt(g_prev)·x0 + c·eps, eps = (y - sqrt(g)·x0)/sqrt(1 - g),
                      c = sqrt(1 - g_prev - sigma²), sigma = eta·sqrt((1 - g_prev)/(1 - g)·(1 - g/g_prev))

    and sigma = 0 on the last step (t = 1: z = 0)."""
    a, b = 1 / math.sqrt(g), math.sqrt(1 / g - 1)
    alpha = g / g_prev
    beta = 1 - alpha
    if sampler in ("sr3", "posterior"):
        m0 = math.sqrt(g_prev) * beta / (1 - g)
        m1 = math.sqrt(alpha) * (1 - g_prev) / (1 - g)
        sigma = math.sqrt(beta) if sampler == "sr3" else math.sqrt((1 - g_prev) * beta / (1 - g))
    else:
        sigma = eta * math.sqrt((1 - g_prev) / (1 - g) * (1 - g / g_prev))
        c = math.sqrt(max(1 - g_prev - sigma ** 2, 0.0))
        m0 = math.sqrt(g_prev) - c * math.sqrt(g) / math.sqrt(1 - g)
        m1 = c / math.sqrt(1 - g)
    return a, b, m0, m1, (sigma if g_prev < 1 else 0.0)


def independent_chain(sampler: str, model, x: torch.Tensor, levels: list[float], y_T: torch.Tensor,
                      noises: list[torch.Tensor], eta: float, clip: float | None) -> torch.Tensor:
    """The whole reverse chain in float64 from the paper's and the public code's formulas, t = T
    down to 1 over `levels` (g_1..g_T), with the given starting noise and per-step z: no table,
    no reverse_step, nothing of sr3fast.diffusion."""
    y, x = y_T.double(), x.double()
    for i, t in enumerate(range(len(levels), 0, -1)):
        g, g_prev = levels[t - 1], (levels[t - 2] if t > 1 else 1.0)
        alpha = g / g_prev
        beta = 1 - alpha
        eps = model.predict_noise(x, y, torch.full((x.shape[0],), g, dtype=torch.float64))
        z = noises[i].double() if t > 1 else torch.zeros_like(y)
        if sampler == "sr3":      # Algorithm 2
            y = (y - beta / math.sqrt(1 - g) * eps) / math.sqrt(alpha) + math.sqrt(beta) * z
            continue
        x0 = y / math.sqrt(g) - math.sqrt(1 / g - 1) * eps
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if sampler == "posterior":  # the public code's p_sample
            mean = (math.sqrt(g_prev) * beta / (1 - g) * x0
                    + math.sqrt(alpha) * (1 - g_prev) / (1 - g) * y)
            y = mean + math.sqrt((1 - g_prev) * beta / (1 - g)) * z
        else:                       # DDIM, Song et al. eq. 12
            sigma = eta * math.sqrt((1 - g_prev) / (1 - g) * (1 - g / g_prev))
            eps_x0 = (y - math.sqrt(g) * x0) / math.sqrt(1 - g)
            y = math.sqrt(g_prev) * x0 + math.sqrt(max(1 - g_prev - sigma ** 2, 0.0)) * eps_x0 + sigma * z
    return y


class ImperfectOracle(nn.Module):
    """A denoiser that behaves like a trained one: its clean-image estimate is a known y_0 plus a
    trajectory-dependent error, x0_hat = y_0 + s·conv([x, y_t]), and it returns the noise that
    estimate implies, eps = (y_t - sqrt(g)·x0_hat)/sqrt(1 - g). The chain then stays image-like
    (a random network makes it blow up by 1/sqrt(g_T)), yet, unlike NoiseOracle's, its end
    depends on the whole trajectory: every step's x0 is off y_0 by s·conv of that step's state.
    Computed in float64 at the float64 level the float32 gamma names (1 - g in float32 is coarse
    near g = 1), then returned in y_t's dtype.

    The sampler's x0 = a·y_t - b·eps is then x0_hat exactly, Lipschitz in y_t with constant s·L
    in the max norm, L the largest sum of absolute conv weights over y_t's channels."""

    def __init__(self, y0: torch.Tensor, schedule: NoiseSchedule, s: float = 0.1, seed: int = 3):
        super().__init__()
        self.y0, self.levels, self.s = y0.double(), schedule.gammas, s
        self.conv = nn.Conv2d(6, 3, 3, padding=1).double()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))

    def predict_noise(self, x, y_t, gamma):
        g = self.levels[(self.levels - gamma[0].double()).abs().argmin()]
        y = y_t.double()
        x0_hat = self.y0 + self.s * self.conv(torch.cat([x.double(), y], 1))
        return ((y - g.sqrt() * x0_hat) / (1 - g).sqrt()).to(y_t.dtype)

    def x0_lipschitz(self) -> float:
        return self.s * self.conv.weight[:, 3:].abs().sum(dim=(1, 2, 3)).max().item()


CHAIN_CASES = [("sr3", 0.0), ("posterior", 0.0), ("ddim", 0.0), ("ddim", 0.5)]


@pytest.mark.parametrize("sampler, eta", CHAIN_CASES, ids=["sr3", "posterior", "ddim", "ddim-eta0.5"])
def test_the_chain_runs_every_step_in_order(public_schedule, sampler, eta, monkeypatch):
    """A full sampling run, recorded step by step, against the schedule read from T down to 1:
    step i must tell the model g_{T-i} (exactly its float32 value), run the coefficients of step
    t = T - i (expected_step), start from the previous step's output (from y_T, drawn first from
    the generator) and add the generator's next draw as z. Then the whole chain against
    `independent_chain`, the same run in float64 with the same noise.

    Chain tolerance, propagated rather than guessed: a float32 step from a state off by e lands
    off by at most K·e + r, where K = |m0|·Lip(x0) + |m1| (ImperfectOracle.x0_lipschitz; clamping
    is 1-Lipschitz) and r is the step's own rounding (step_bound) plus |m0·b| times
    the model's float32 error at that state (against its float64 evaluation). A run in the wrong
    order, or with a wrong table row, is off by the size of the image."""
    schedule = respace(public_schedule, 50)
    steps = len(schedule)
    levels = schedule.gammas.tolist()                   # g_1 .. g_T, float64
    x = images(1)
    model = ImperfectOracle(images(5), schedule)
    clip = {"sr3": None, "posterior": 1.0, "ddim": None}[sampler]
    recorded, told = [], []

    def recording_step(y_t, eps, coefs, noise=None, clip=None, generator=None):
        out = reference.reverse_step(y_t, eps, coefs, noise, clip, generator)
        recorded.append((y_t.clone(), eps.clone(), coefs.clone(), noise.clone(), out.clone()))
        return out

    class Telling:
        def predict_noise(self, x, y_t, gamma):
            told.append(gamma.clone())
            return model.predict_noise(x, y_t, gamma)

    monkeypatch.setattr(ops, "reverse_step", recording_step)
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    result = sample(sampler, Telling(), x, schedule, generator=torch.Generator().manual_seed(4), **kwargs)

    draws = torch.Generator().manual_seed(4)
    y_T = torch.randn(x.shape, generator=draws)
    stochastic = sampler != "ddim" or eta > 0
    assert len(recorded) == len(told) == steps
    noises, error = [], 0.0
    for i, ((y_t, eps, coefs, z, out), gamma) in enumerate(zip(recorded, told)):
        t = steps - i
        g, g_prev = levels[t - 1], (levels[t - 2] if t > 1 else 1.0)
        assert torch.equal(gamma, torch.full_like(gamma, g)), f"step {i} told the model {gamma.tolist()}, not g_{t} = {g}"
        want = torch.tensor(expected_step(sampler, g, g_prev, eta), dtype=torch.float64)
        # each coefficient rounded to float32 once, from float64 formulas that may cancel (m0 of
        # DDIM is a difference of terms up to a + 1): a few float32 units of those terms
        a, b, m0, m1, sigma = (abs(c) for c in want.tolist())
        scale = torch.tensor([a, b, m0 + m1 * (1 + math.sqrt(g)) + 1, m1 + 1, sigma + 1], dtype=torch.float64)
        assert ((coefs[..., :5].double() - want).abs() <= 4 * EPS32 * scale).all(), \
            f"step {i} (t = {t}) ran coefficients {coefs[0].tolist()}, not {want.tolist()}"
        assert coefs.shape[-1] == 5 or (coefs[..., 5:] == 0).all(), f"step {i}: a history term (m2, m3)"
        previous = y_T if i == 0 else recorded[i - 1][4]
        assert torch.equal(y_t, previous), f"step {i} did not start from step {i - 1}'s output"
        fresh = torch.randn(x.shape, generator=draws) if stochastic and t > 1 else torch.zeros_like(y_T)
        assert torch.equal(z, fresh), f"step {i}: not the generator's next draw"
        noises.append(fresh)
        exact_eps = model.predict_noise(x, y_t.double(), torch.full((x.shape[0],), g, dtype=torch.float64))
        model_error = (eps.double() - exact_eps).abs().max().item()
        rounding = step_bound(coefs, y_t, eps, z).max().item() + m0 * b * model_error
        error = (m0 * model.x0_lipschitz() + m1) * error + rounding
    assert torch.equal(result, recorded[-1][4])

    exact = independent_chain(sampler, model, x, levels, y_T, noises, eta, clip)
    difference = (result.double() - exact).abs().max().item()
    moved = (exact - model.y0).abs().max().item()
    print(f"{sampler} eta={eta}: chain vs independent float64 loop {difference:.3e} (bound {error:.3e}); "
          f"the result is {moved:.2f} from y_0, the trajectory matters")
    assert difference <= error
