"""DPM-Solver++(2M), (3M) and their SDE forms: the tables against closed forms, the samplers
against independent implementations of the equations, and convergence at the theoretical order on
Gaussian data, where the exact denoiser and the exact sample are known in closed form.

Gaussian toy: every pixel of y_0 is N(mu, s²) independently. Then at level g (alpha = sqrt(g),
sigma = sqrt(1 - g)) E[y_0 | y_t] = mu + s²·alpha/(alpha²s² + sigma²)·(y_t - alpha·mu), and the
probability-flow ODE carries y_T to y_0 = mu + s·(y_T - alpha_T·mu)/sqrt(alpha_T²s² + sigma_T²)
(the standardised value is conserved). Its reverse SDE ends in N(mu, s²) exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

import sr3fast
from sr3fast.diffusion import (HISTORY, MULTISTEP, NoiseSchedule, log_snr, make_betas, respace,
                               reverse_coefficients, sample)

MU, STD = 0.3, 0.2


@pytest.fixture(autouse=True)
def reference_backend():
    """The samplers' maths, on the readable reference op (the fast ops have their own tests)."""
    with sr3fast.backend("reference"):
        yield


def lambda_uniform(steps: int, lam_min: float = -5.0, lam_max: float = 8.0) -> NoiseSchedule:
    """A schedule whose levels are uniform in lambda = 0.5·log(g/(1 - g)) from lam_max (step 1)
    down to lam_min (step T): the spacing DPM-Solver's order analysis assumes."""
    lam = torch.linspace(lam_max, lam_min, steps, dtype=torch.float64)
    gammas = torch.sigmoid(2 * lam)
    previous = torch.cat([gammas.new_ones(1), gammas[:-1]])
    return NoiseSchedule(1 - gammas / previous)


class GaussianDenoiser:
    """The exact noise prediction for y_0 ~ N(MU, STD²) per pixel, in float64."""

    def predict_noise(self, x, y_t, gamma):
        g = gamma.double().view(-1, 1, 1, 1)
        y = y_t.double()
        x0 = MU + STD ** 2 * g.sqrt() / (g * STD ** 2 + 1 - g) * (y - g.sqrt() * MU)
        return ((y - g.sqrt() * x0) / (1 - g).sqrt()).to(y_t.dtype)


def exact_ode_sample(y_T: torch.Tensor, g_T: float, g_1: float | None = None) -> torch.Tensor:
    """The exact probability-flow ODE solution from y_T at level g_T, at g = 1; or, given the
    schedule's cleanest level g_1, what a sampler's steps converge to: the ODE solved to g_1,
    then its last step's x0 estimate there (g_1 < 1 leaves a difference of ~e^(-2·lambda_1),
    the same for every step count, which would floor the measured errors)."""
    standardised = (y_T.double() - g_T ** 0.5 * MU) / (g_T * STD ** 2 + 1 - g_T) ** 0.5
    if g_1 is None:
        return MU + STD * standardised
    return MU + STD ** 2 * g_1 ** 0.5 * standardised / (g_1 * STD ** 2 + 1 - g_1) ** 0.5


class SmoothModel:
    """A nonlinear stand-in network: eps depends on y_t, the condition and the level."""

    def predict_noise(self, x, y_t, gamma):
        g = gamma.view(-1, 1, 1, 1)
        return torch.tanh(0.8 * y_t + 0.3 * x) * (1.2 - g) + 0.1 * torch.sin(3 * y_t)


def _observed_order(errors: list[float]) -> list[float]:
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


# ------------------------------------------------------------------------------- tables

@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m"])
def test_first_order_rows_are_ddim_and_the_posterior(solver):
    """The first step has no history: DPM-Solver++ then takes DDIM's step (eta = 0), and its SDE
    form with eta = 1 the exact DDPM posterior step (same mean weights, same variance)."""
    schedule = respace(NoiseSchedule(make_betas("linear", 2000, 1e-6, 1e-2)), 25)
    ddim, posterior = (reverse_coefficients(schedule, s, 1)[0, 0] for s in ("ddim", "posterior"))
    ode, sde = (reverse_coefficients(schedule, s, 1)[0, 0] for s in (solver, solver + "_sde"))
    torch.testing.assert_close(ode[:5], ddim[:5], rtol=2e-6, atol=0)
    torch.testing.assert_close(sde[:5], posterior[:5], rtol=2e-6, atol=0)
    assert ode[5:].tolist() == [0, 0] and sde[5:].tolist() == [0, 0]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_second_order_rows_follow_the_paper(sampler):
    """Rows 1..T-2 written out from Lu et al. (2022b), Algorithm 2 (and k-diffusion's midpoint SDE
    form), in float64: m1 = (sigma'/sigma)·e^(-eta·h), m0 + m2 = alpha'·(1 - e^(-(1+eta)h)),
    m2 = -(m0 + m2)/(2r), sigma_z = sigma'·sqrt(1 - e^(-2·eta·h)). Catches a wrong r (the ratio
    inverted), a history term on the wrong side, or lambda taken as the full log-SNR."""
    eta = 0.0 if sampler == "dpmpp_2m" else 1.0
    schedule = respace(NoiseSchedule(make_betas("linear", 2000, 1e-6, 1e-2)), 12)
    table = reverse_coefficients(schedule, sampler, 1)[:, 0].double()
    levels = schedule.gammas.flip(0).tolist() + [1.0]     # loop order, then y_0's level
    lam = [0.5 * math.log(g / (1 - g)) for g in levels[:-1]]
    for i in range(1, len(lam) - 1):
        g, g_next = levels[i], levels[i + 1]
        h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
        r = h_prev / h
        weight = g_next ** 0.5 * (1 - math.exp(-(1 + eta) * h))
        expected = [g ** -0.5, (1 / g - 1) ** 0.5, weight * (1 + 1 / (2 * r)),
                    ((1 - g_next) / (1 - g)) ** 0.5 * math.exp(-eta * h),
                    (1 - g_next) ** 0.5 * math.sqrt(1 - math.exp(-2 * eta * h)), -weight / (2 * r),
                    0.0]
        torch.testing.assert_close(table[i], torch.tensor(expected, dtype=torch.float64),
                                   rtol=3e-6, atol=1e-7)
    assert table[-1, 2:].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]     # y_0 is the last x0 estimate


def _weighted_integral(p, h: float, kappa: float, points: int = 20001) -> float:
    """int_0^h kappa·e^(-kappa·(h - u))·p(u) du by composite Simpson: the exact update of an x0
    that follows p(u) in u = lambda - lambda_i, written without the solver's closed forms."""
    u = torch.linspace(0, h, points, dtype=torch.float64)
    f = kappa * torch.exp(-kappa * (h - u)) * p(u)
    weights = torch.ones(points, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    return (h / (points - 1) / 3 * (weights * f).sum()).item()


@pytest.mark.parametrize("sampler, eta", [("dpmpp_3m", 0.0), ("dpmpp_3m_sde", 1.0),
                                          ("dpmpp_3m_sde", 0.3)])
def test_third_order_rows_integrate_quadratics_exactly(sampler, eta):
    """What makes 3M third order: with x0 estimates lying on any quadratic in lambda, each
    third-order row's m0·D_i + m2·D_{i-1} + m3·D_{i-2} is alpha' times the integral of that
    quadratic against the exponential integrator's weight (by quadrature here, not the closed
    forms); the second row and the one before the last are second order (linear exactly, m3 = 0).
    m1 and sigma as in 2M. Catches a second difference weighted by half (as phi_3 read as the
    weight of (D1_0 - D1_1)/(r0 + r1) would give), the step ratios swapped, or m2/m3 exchanged."""
    schedule = respace_log_snr_like(12)
    table = reverse_coefficients(schedule, sampler, 1, eta=eta)[:, 0].double()
    levels = schedule.gammas.flip(0).tolist() + [1.0]
    lam = [0.5 * math.log(g / (1 - g)) for g in levels[:-1]]
    kappa = 1 + eta
    quadratics = [lambda u: 0.3 + 0 * u, lambda u: 0.5 * u - 0.2, lambda u: 0.7 * u ** 2 - 0.1 * u]
    for i in range(1, len(lam) - 1):
        g, g_next = levels[i], levels[i + 1]
        h = lam[i + 1] - lam[i]
        a, b, m0, m1, sigma, m2, m3 = table[i].tolist()
        assert m1 == pytest.approx(((1 - g_next) / (1 - g)) ** 0.5 * math.exp(-eta * h), rel=3e-6)
        assert sigma == pytest.approx((1 - g_next) ** 0.5 * math.sqrt(-math.expm1(-2 * eta * h)),
                                      rel=3e-6, abs=1e-7)
        third_order = 2 <= i < len(lam) - 2
        if not third_order:
            assert m3 == 0
        for degree, p in enumerate(quadratics):
            if degree == 2 and not third_order:
                continue
            at = torch.tensor([0.0, lam[i - 1] - lam[i], (lam[i - 2] - lam[i]) if i >= 2 else 0.0],
                              dtype=torch.float64)
            d = p(at).tolist()
            got = m0 * d[0] + m2 * d[1] + m3 * d[2]
            want = g_next ** 0.5 * _weighted_integral(p, h, kappa)
            # float32 coefficients (~6e-8 relative each) on values of ~10x the result's size
            assert got == pytest.approx(want, rel=2e-5, abs=2e-6), (i, degree, got, want)
    assert table[-1, 2:].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def respace_log_snr_like(steps: int) -> NoiseSchedule:
    """A short schedule with unequal lambda steps (from respacing by index), so the step ratios
    r0 != r1 != 1 and a formula that confuses them shows."""
    return respace(NoiseSchedule(make_betas("linear", 2000, 1e-6, 1e-2)), steps)


def test_log_snr():
    g = torch.tensor([0.5, 0.9, 1e-3], dtype=torch.float64)
    torch.testing.assert_close(log_snr(g), 0.5 * torch.log(g / (1 - g)))


# ----------------------------------------------------- against an independent implementation

def dpm_solver_pp_2m(model, x, schedule, y_T, *, eta=0.0, clip=1.0, generator=None):
    """DPM-Solver++(2M) written the way the paper states it, step by step, independent of
    sr3fast's tables and fused op: times are the schedule's levels from g_T to 1, lambda_i =
    log(alpha_i/sigma_i), D_i = clip(data prediction), first and last steps first order."""
    levels = schedule.gammas.flip(0).tolist() + [1.0]
    y = y_T.double()
    previous_x0, previous_h = None, None
    for i in range(len(levels) - 1):
        g, g_next = levels[i], levels[i + 1]
        eps = model.predict_noise(x, y.float(), torch.full((y.shape[0],), g)).double()
        x0 = (y - math.sqrt(1 - g) * eps) / math.sqrt(g)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if g_next == 1.0:                       # the last step: y_0 = D
            return x0
        alpha_next, sigma, sigma_next = math.sqrt(g_next), math.sqrt(1 - g), math.sqrt(1 - g_next)
        h = 0.5 * math.log(g_next / (1 - g_next)) - 0.5 * math.log(g / (1 - g))
        if previous_x0 is None:
            d = x0
        else:
            r = previous_h / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous_x0
        y = (sigma_next / sigma * math.exp(-eta * h) * y
             + alpha_next * -math.expm1(-(1 + eta) * h) * d)
        if eta > 0:
            z = torch.randn(y.shape, generator=generator, dtype=torch.float32).double()
            y = y + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * z
        previous_x0, previous_h = x0, h
    raise AssertionError("the schedule did not end at g = 1")


def dpm_solver_pp_3m(model, x, schedule, y_T, *, eta=0.0, clip=1.0, generator=None,
                     model_dtype=torch.float32):
    """DPM-Solver++(3M) step by step in the form of the reference code (Lu et al.'s
    multistep_dpm_solver_third_update: first and second divided differences D1, D2 of the data
    predictions with step ratios r0, r1), in float64, independent of sr3fast's tables: with
    x = (1 + eta)·h the weights of D, D1, D2 are 1 - e^(-x), 1 - (1 - e^(-x))/x and
    1 - 2/x + 2(1 - e^(-x))/x² (the exact moments of the exponential weight; D2 approximates
    h²·x0''/2). Orders: 1 on the first step, 2 on the second and the one before the last, else
    3; the last step returns D. model_dtype: of what the model is given, y_t and its level
    (sr3fast gives float32)."""
    levels = schedule.gammas.flip(0).tolist() + [1.0]
    steps = len(levels) - 1
    y = y_T.double()
    history = []                                 # (lambda, D) of earlier steps, newest last
    for i in range(steps):
        g, g_next = levels[i], levels[i + 1]
        gamma = torch.full((y.shape[0],), g, dtype=model_dtype)
        eps = model.predict_noise(x, y.to(model_dtype), gamma).double()
        d = (y - math.sqrt(1 - g) * eps) / math.sqrt(g)
        if clip is not None:
            d = d.clamp(-clip, clip)
        if g_next == 1.0:
            return d
        lam, lam_next = (0.5 * math.log(v / (1 - v)) for v in (g, g_next))
        h = lam_next - lam
        x_ = (1 + eta) * h
        phi1 = -math.expm1(-x_)
        phi2 = 1 - phi1 / x_
        psi = 1 - 2 / x_ + 2 * phi1 / x_ ** 2
        order = min(3, len(history) + 1, 2 if i == steps - 2 else 3)
        update = phi1 * d
        if order >= 2:
            r0 = (lam - history[-1][0]) / h
            d1_0 = (d - history[-1][1]) / r0
            update = update + phi2 * d1_0
            if order == 3:
                r1 = (history[-1][0] - history[-2][0]) / h
                d1_1 = (history[-1][1] - history[-2][1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                update = phi1 * d + phi2 * d1 + psi * d2
        sigma, sigma_next = math.sqrt(1 - g), math.sqrt(1 - g_next)
        y = sigma_next / sigma * math.exp(-eta * h) * y + math.sqrt(g_next) * update
        if eta > 0:
            z = torch.randn(y.shape, generator=generator, dtype=torch.float32).double()
            y = y + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * z
        history.append((lam, d))
    raise AssertionError("the schedule did not end at g = 1")


INDEPENDENT = {"dpmpp_2m": dpm_solver_pp_2m, "dpmpp_2m_sde": dpm_solver_pp_2m,
               "dpmpp_3m": dpm_solver_pp_3m, "dpmpp_3m_sde": dpm_solver_pp_3m}


@pytest.mark.parametrize("sampler, eta", [("dpmpp_2m", 0.0), ("dpmpp_2m_sde", 1.0),
                                          ("dpmpp_2m_sde", 0.4), ("dpmpp_3m", 0.0),
                                          ("dpmpp_3m_sde", 1.0), ("dpmpp_3m_sde", 0.4)])
@pytest.mark.parametrize("clip", [1.0, None], ids=["clip", "noclip"])
def test_sampler_matches_independent_implementation(sampler, eta, clip):
    schedule = respace(NoiseSchedule(make_betas("linear", 2000, 1e-6, 1e-2)), 15)
    x = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    options = {"eta": eta} if sampler.endswith("_sde") else {}
    got = sample(sampler, SmoothModel(), x, schedule, y_T=y_T, clip=clip,
                 generator=torch.Generator().manual_seed(3), **options)
    want = INDEPENDENT[sampler](SmoothModel(), x, schedule, y_T, eta=eta, clip=clip,
                                generator=torch.Generator().manual_seed(3))
    # a float32 state through 15 steps against float64: each step rounds within a few ulps of
    # the magnitudes involved (up to ~10x the state's, from a, b ~ 10 at g_T), so 15 steps stay
    # far below 2e-5 of the largest value (unclipped, this stand-in grows the state to ~230)
    error = (got.double() - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    print(f"{sampler} eta={eta} clip={clip}: max |sr3fast - paper| = {error:.2e} (scale {scale:.1f})")
    assert error < 2e-5 * scale


# ----------------------------------------------------------- convergence on Gaussian data

@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_ode_solvers_converge_at_their_order(sampler, order):
    """Pathwise error against the exact ODE solution from the same y_T: halving the step in
    lambda divides it by 2^order (observed order within 0.25 of it over 40 -> 80 -> 160 steps)."""
    x = torch.zeros(1, 3, 8, 8)
    y_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    orders = _ode_orders(lambda schedule: sample(sampler, GaussianDenoiser(), x, schedule, y_T=y_T,
                                                 clip=None),
                         y_T, (40, 80, 160), sampler)
    assert all(abs(o - order) < 0.25 for o in orders), orders


def _ode_orders(solve, y_T: torch.Tensor, step_counts, name: str) -> list[float]:
    """Observed orders of solve(schedule) against the exact ODE solution from y_T over
    lambda_uniform schedules of `step_counts` steps (max pathwise error)."""
    errors = []
    for steps in step_counts:
        schedule = lambda_uniform(steps)
        exact = exact_ode_sample(y_T, schedule.gammas[-1].item(), schedule.gammas[0].item())
        errors.append((solve(schedule).double() - exact).abs().max().item())
    orders = _observed_order(errors)
    print(f"{name}: errors {errors}, observed orders {orders}")
    return orders


def test_3m_converges_at_third_order():
    """3M's steps are third order (the quadrature test above), but its first step, with no
    history, is first order, and that step's O(h²) error would cap the global order at 2 on a
    problem where x0 changes over it (measured 1.9-2.0 on SmoothModel). On Gaussian data started
    from lambda = -5, x0 hardly changes over the first step, so the steps' own order shows: the
    independent form (dpm_solver_pp_3m, which the sampler matches above) in float64 over
    80 -> 160 -> 320 -> 640 steps and the sampler itself (float32 state) over 20 -> 40 -> 80 must
    beat 2.75 (measured: 4.04-4.06 and 4.1). A 3M whose quadratic term were lost shows 2."""
    x = torch.zeros(1, 1, 2, 2)
    y_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    orders = _ode_orders(lambda schedule: dpm_solver_pp_3m(GaussianDenoiser(), x, schedule, y_T,
                                                           clip=None, model_dtype=torch.float64),
                         y_T, (80, 160, 320, 640), "dpmpp_3m in float64")
    assert all(o > 2.75 for o in orders), orders

    x = torch.zeros(1, 3, 8, 8)
    y_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    orders = _ode_orders(lambda schedule: sample("dpmpp_3m", GaussianDenoiser(), x, schedule,
                                                 y_T=y_T, clip=None),
                         y_T, (20, 40, 80), "dpmpp_3m sampler")
    assert all(o > 2.75 for o in orders), orders


def output_distribution(sampler: str, schedule: NoiseSchedule, *, exact_start: bool,
                        eta: float | None = None):
    """(mean, variance) of the sample per pixel when the model is GaussianDenoiser, computed
    exactly: every step is affine in (y, x0_prev, x0_prev2) plus Gaussian noise, so mean and
    covariance propagate in closed form through the sampler's own table (the history is 0 at
    first). y_T is
    N(0, 1), as the samplers draw it, or with exact_start the true marginal at g_T,
    N(alpha_T·MU, g_T·STD² + 1 - g_T), from which the exact ODE and SDE both end in N(MU, STD²):
    the error is then the discretisation's alone."""
    table = reverse_coefficients(schedule, sampler, 1, eta=eta)[:, 0].double()
    levels = schedule.gammas.flip(0).tolist()
    g_T = levels[0]
    start_mean, start_var = (g_T ** 0.5 * MU, g_T * STD ** 2 + 1 - g_T) if exact_start else (0.0, 1.0)
    mean = torch.tensor([start_mean, 0.0, 0.0], dtype=torch.float64)    # (y, x0_prev, x0_prev2)
    cov = torch.zeros(3, 3, dtype=torch.float64)
    cov[0, 0] = start_var
    for (a, b, m0, m1, sigma, m2, m3), g in zip(table.tolist(), levels):
        # x0 = a·y - b·eps(y) with the exact eps: x0 = k·y + c
        alpha, s2 = math.sqrt(g), STD ** 2
        k = s2 * alpha / (g * s2 + 1 - g)
        c = MU - k * alpha * MU
        # (y, p, q) -> (y', x0, p):  y' = (m1 + m0·k)·y + m2·p + m3·q + m0·c + sigma·z;  x0 = k·y + c
        step = torch.tensor([[m1 + m0 * k, m2, m3], [k, 0.0, 0.0], [0.0, 1.0, 0.0]],
                            dtype=torch.float64)
        mean = step @ mean + torch.tensor([m0 * c, c, 0.0], dtype=torch.float64)
        cov = step @ cov @ step.T
        cov[0, 0] += sigma ** 2
    return mean[0].item(), cov[0, 0].item()


@pytest.mark.parametrize("sampler, order", [("posterior", 1), ("ddim", 1), ("dpmpp_2m", 2),
                                            ("dpmpp_2m_sde", 2), ("dpmpp_3m_sde", 2)])
def test_samples_converge_in_distribution(sampler, order):
    """Started from the true marginal, every sampler must end in N(MU, STD²): the mean and
    variance errors shrink as steps grow (weak convergence) at the sampler's order: observed
    order over 100 -> 200 -> 400 steps within 0.3 of it (measured: posterior 0.95-0.97,
    DDIM ~1, DPM-Solver++ 2M and its SDE form 1.96-2.0; 3M's SDE form 2.03-2.09, the noise
    term limiting it to second order in distribution, at about a third of 2M-SDE's error)."""
    errors = []
    for steps in (100, 200, 400):
        mean, variance = output_distribution(sampler, lambda_uniform(steps), exact_start=True)
        errors.append(abs(mean - MU) + abs(variance - STD ** 2))
    orders = _observed_order(errors)
    print(f"{sampler}: distribution errors {errors}, observed orders {orders}")
    assert all(abs(o - order) < 0.3 for o in orders), orders


def test_3m_converges_in_distribution_beyond_second_order():
    """The ODE solver 3M from the true marginal: observed order over 25 -> 50 -> 100 steps above
    2.75 (measured 4.1: pre-asymptotic; beyond ~150 steps the float32 table floors the error near
    1e-7)."""
    errors = []
    for steps in (25, 50, 100):
        mean, variance = output_distribution("dpmpp_3m", lambda_uniform(steps), exact_start=True)
        errors.append(abs(mean - MU) + abs(variance - STD ** 2))
    orders = _observed_order(errors)
    print(f"dpmpp_3m: distribution errors {errors}, observed orders {orders}")
    assert all(o > 2.75 for o in orders), orders


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_distribution_propagation_agrees_with_sampling(sampler):
    """The closed-form propagation above against the sampler itself on 2^18 pixels, so the
    convergence test checks what the samplers do (6 standard errors)."""
    schedule = lambda_uniform(30, lam_min=-7.0)
    mean, variance = output_distribution(sampler, schedule, exact_start=False)
    x = torch.zeros(4, 4, 128, 128)
    result = sample(sampler, GaussianDenoiser(), x, schedule, clip=None,
                    generator=torch.Generator().manual_seed(5)).double()
    n = result.numel()
    assert abs(result.mean().item() - mean) < 6 * math.sqrt(variance / n)
    assert abs(result.var().item() - variance) < 6 * variance * math.sqrt(2 / n)


# ------------------------------------------------------------------------------- errors

def test_bad_sampler_arguments_say_what_to_do():
    schedule = respace(NoiseSchedule(make_betas("linear", 100, 1e-4, 2e-2)), 10)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="unknown sampler 'dpmpp_3x'"):
        sample("dpmpp_3x", SmoothModel(), x, schedule)
    for sampler in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        with pytest.raises(ValueError, match=f"{sampler}: eta must lie in"):
            sample(sampler, SmoothModel(), x, schedule, eta=1.5)
    with pytest.raises(ValueError, match="steps"):
        respace(schedule, 0)
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.1, 1.5], dtype=torch.float64))


# ------------------------------------------------------------- the schedule they step over

@pytest.mark.parametrize("start_gamma", [None, 0.5])
def test_respace_log_snr_spaces_evenly_between_the_schedules_ends(start_gamma):
    """Evenly in lambda from the start (start_gamma, else g_T) to the cleanest level g_1, both
    kept exactly; one step is the start level alone."""
    from sr3fast.diffusion import respace_log_snr

    training = NoiseSchedule(make_betas("linear", 2000, 1e-6, 1e-2))
    g_start = start_gamma or training.gammas[-1].item()
    for steps in (2, 7, 20):
        levels = respace_log_snr(training, steps, start_gamma).gammas
        lam = log_snr(levels).flip(0)                 # loop order: noisy first
        assert levels.shape == (steps,)
        torch.testing.assert_close(lam[0], log_snr(torch.tensor(g_start, dtype=torch.float64)), rtol=0,
                                   atol=1e-9)
        torch.testing.assert_close(lam[-1], log_snr(training.gammas[:1]).squeeze(0), rtol=0, atol=1e-9)
        gaps = lam.diff()
        torch.testing.assert_close(gaps, gaps.mean().expand_as(gaps), rtol=1e-9, atol=0)
    one = respace_log_snr(training, 1, start_gamma).gammas
    torch.testing.assert_close(one, torch.tensor([g_start], dtype=torch.float64), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="below the schedule's cleanest level"):
        respace_log_snr(training, 5, 1 - 1e-9)


@pytest.mark.parametrize("sampler", ["ddim", "posterior", "dpmpp_2m", "dpmpp_2m_sde"])
def test_upscale_steps_the_dpm_solvers_over_log_snr_and_the_others_over_the_training_steps(sampler,
                                                                                           monkeypatch):
    """With no schedule given: DPM-Solver++ samplers over respace_log_snr, the single-step ones
    over the training schedule respaced by index (the public code's convention), from the same
    start either way."""
    from sr3fast.diffusion import respace_log_snr, truncate

    model = sr3fast.load("tiny", seed=0)
    training = NoiseSchedule.from_config(model.config.schedule)
    seen = {}
    real_sample = sr3fast.diffusion.sample

    def spy(name, model, x, schedule, **kwargs):
        seen["gammas"] = schedule.gammas.clone()
        return real_sample(name, model, x, schedule, **kwargs)

    monkeypatch.setattr(sr3fast.diffusion, "sample", spy)
    for start_gamma in (0, 0.5):
        sr3fast.upscale(torch.rand(1, 3, 4, 4), model=model, sampler=sampler, steps=6, seed=0,
                        start_gamma=start_gamma, progress=False)
        if sampler in MULTISTEP:
            want = respace_log_snr(training, 6, start_gamma or None)
        else:
            want = respace(truncate(training, start_gamma) if start_gamma else training, 6)
        torch.testing.assert_close(seen["gammas"], want.gammas, rtol=0, atol=0)
