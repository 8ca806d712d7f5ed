"""Per-step tables of the reverse process: the contract every SR3 sampling loop consumes.

Each step of every sampler here is the one fused update `sr3fast.ops.reverse_step`:

    x0     = a·y_t - b·eps                          the clean image implied by the predicted noise
    x0     = clamp(x0, -clip, clip)                 only for samplers that clip
    y_prev = m0·x0 + m1·y_t + m2·x0_prev + m3·x0_prev2 + sigma·z
                                                    z ~ N(0, I); x0_prev, x0_prev2: the x0 of the
                                                    previous step and of the one before it

with a = 1/sqrt(g_t) and b = sqrt(1/g_t - 1) for every sampler (inverting
y_t = sqrt(g_t)·y_0 + sqrt(1 - g_t)·eps); the samplers differ in m0, m1, m2, m3, sigma and clip.
Single-step samplers have m2 = m3 = 0; the multistep solvers carry HISTORY[sampler] past x0
estimates from step to step (DPM-Solver++ 2M one, 3M two; m3 = 0 unless two).

Contract (the Python samplers and the C++ sampling loop follow it alike):

    coefs  = reverse_coefficients(schedule, sampler, B, device)  # (T, B, 7) float32, contiguous
    gammas = noise_levels(schedule, B, device)                   # (T, B)    float32, contiguous
    y = y_T ~ N(0, I);  x0_prev = x0_prev2 = 0   # multistep samplers only (HISTORY: 1 or 2)
    for i in 0 .. T-1:                       # loop step i is diffusion step t = T - i
        eps = f(x, y, gammas[i])             # gammas[i] = g_t, the level the network is told
        y = reverse_step(y, eps, coefs[i], z_i, clip=CLIP[sampler])         # single-step, or
        y, x0 = reverse_step(y, eps, coefs[i], z_i, clip=CLIP[sampler], x0_prev=x0_prev
                             [, x0_prev2=x0_prev2])                          # HISTORY 1 [2]
        x0_prev2, x0_prev = x0_prev, x0      # a shift of references, no copies
                                             # coefs[i] = (a, b, m0, m1, sigma, m2, m3) of step t
                                             # z_i: fresh N(0, I); zeros on the last step
    return y                                 # y_0

Row 0 is step T; its m2 and m3 are 0 (there is no history yet), and row 1's m3 is 0. The last
row (t = 1) has sigma = 0, m0 = 1, m1 = m2 = m3 = 0, so y_0 is the x0 estimate itself. Both tables are built once per sampling call: float64 maths on the host, one copy to
the device, so the loop has no Python floats and no host→device copies.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_schedule
from .schedules import POSTERIOR_VARIANCE_FLOOR, NoiseSchedule

SAMPLER_NAMES = ("sr3", "posterior", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "dpmpp_3m_sde")
# the x0 clamp each sampler applies (the public checkpoints were sampled with clip_denoised=True;
# DPM-Solver++ clips its data prediction, "thresholding" in Lu et al. 2022b)
CLIP = {"sr3": None, "posterior": 1.0, "ddim": None, "dpmpp_2m": 1.0, "dpmpp_2m_sde": 1.0,
        "dpmpp_3m": 1.0, "dpmpp_3m_sde": 1.0}
# how many past x0 estimates each multistep sampler's update carries (coefficients m2, m3)
HISTORY = {"dpmpp_2m": 1, "dpmpp_2m_sde": 1, "dpmpp_3m": 2, "dpmpp_3m_sde": 2}
MULTISTEP = frozenset(HISTORY)
# samplers with a noise scale eta, and its default
ETA_DEFAULT = {"ddim": 0.0, "dpmpp_2m_sde": 1.0, "dpmpp_3m_sde": 1.0}
COLUMNS = ("a", "b", "m0", "m1", "sigma", "m2", "m3")


def _check_sampling_schedule(schedule: NoiseSchedule) -> None:
    check_schedule(schedule, "sampling")
    if schedule.gammas[-1].item() <= 0:
        raise ValueError(
            "this schedule reaches g_T = 0 (its last beta is 1, as in 'jsd'): y_T is then pure noise "
            "and the predicted noise says nothing about y_0, so no sampler can take that step. "
            "Sample with the last step dropped: NoiseSchedule(schedule.betas[:-1]).")


def _x0_from_eps(s: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with x0 = a·y_t - b·eps, from y_t = sqrt(g_t)·x0 + sqrt(1 - g_t)·eps."""
    return s.gammas.rsqrt(), (1 / s.gammas - 1).sqrt()


def _sr3_rows(s: NoiseSchedule) -> torch.Tensor:
    """Algorithm 2: the posterior mean with x0 substituted, which is exactly eq. 11's
    (1/sqrt(a_t))·(y_t - (1 - a_t)/sqrt(1 - g_t)·eps); variance 1 - a_t; z = 0 at t = 1."""
    a, b = _x0_from_eps(s)
    sigma = s.betas.sqrt()
    sigma[0] = 0
    return _rows(a, b, s.posterior_mean_coef_x0, s.posterior_mean_coef_yt, sigma)


def _posterior_rows(s: NoiseSchedule) -> torch.Tensor:
    """The public SR3 code's p_sample: posterior mean of the clipped x0 and the posterior
    standard deviation exp(0.5·log(max(var, 1e-20))); z = 0 at t = 1."""
    a, b = _x0_from_eps(s)
    sigma = s.posterior_variance.clamp(min=POSTERIOR_VARIANCE_FLOOR).sqrt()
    sigma[0] = 0
    return _rows(a, b, s.posterior_mean_coef_x0, s.posterior_mean_coef_yt, sigma)


def _ddim_rows(s: NoiseSchedule, eta: float) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) from level g_t to g_{t-1}:

        y_prev = sqrt(g_{t-1})·x0 + sqrt(1 - g_{t-1} - sigma²)·eps + sigma·z,
        sigma  = eta·sqrt((1 - g_{t-1})/(1 - g_t))·sqrt(1 - g_t/g_{t-1}),

    with eps re-expressed through x0 and y_t, eps = (y_t - sqrt(g_t)·x0)/sqrt(1 - g_t), so that
    a clipped x0 stays consistent with the direction term. eta = 1 is the posterior variance.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"sample_ddim: eta must lie in [0, 1] (0: deterministic DDIM, 1: the "
                         f"posterior variance of DDPM), got {eta!r}")
    a, b = _x0_from_eps(s)
    g, g_prev = s.gammas, s.gammas_prev
    sigma = eta * ((1 - g_prev) / (1 - g) * (1 - g / g_prev)).sqrt()
    direction = (1 - g_prev - sigma.square()).clamp(min=0).sqrt() / (1 - g).sqrt()
    m0 = g_prev.sqrt() - direction * g.sqrt()
    return _rows(a, b, m0, direction, sigma)


def log_snr(gammas: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha/sigma) = 0.5·log(g/(1 - g)), half the log signal-to-noise ratio of
    y_t = sqrt(g)·y_0 + sqrt(1 - g)·eps: the time variable of DPM-Solver (Lu et al. 2022)."""
    return 0.5 * (gammas.log() - torch.log1p(-gammas))


def _exponential_step(s: NoiseSchedule, eta: float):
    """What every DPM-Solver++ row shares, per step from g to g' (schedule order): (a, b) of
    the x0 estimate, alpha', h = lambda' - lambda (inf on the last step, t = 1), the weight of y,
    m1 = (sigma'/sigma)·e^(-eta·h), and the noise scale sigma'·sqrt(1 - e^(-2·eta·h))."""
    a, b = _x0_from_eps(s)
    g, g_next = s.gammas, s.gammas_prev          # step t goes from g_t to g_{t-1}; t = 1 ends at 1
    alpha_next, sigma, sigma_next = g_next.sqrt(), (1 - g).sqrt(), (1 - g_next).sqrt()
    h = log_snr(g_next) - log_snr(g)
    m1 = sigma_next / sigma * torch.exp(-eta * h)
    noise = sigma_next * (-torch.expm1(-2 * eta * h)).sqrt()
    return a, b, alpha_next, h, m1, noise


def _dpmpp_rows(s: NoiseSchedule, eta: float) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2: multistep, second order, data
    prediction), with eta > 0 its SDE form (the "midpoint" SDE-DPM-Solver++(2M) of
    k-diffusion's sample_dpmpp_2m_sde), over the noise levels of the schedule. For a step from
    level g (alpha = sqrt(g), sigma = sqrt(1 - g), lambda = log(alpha/sigma)) to g' with
    h = lambda' - lambda and the x0 estimates D_i of this step and D_{i-1} of the previous:

        y' = (sigma'/sigma)·e^(-eta·h)·y + A·((1 + 1/(2r))·D_i - 1/(2r)·D_{i-1})
             + sigma'·sqrt(1 - e^(-2·eta·h))·z,      A = alpha'·(1 - e^(-(1 + eta)·h)),

    r = h_{i-1}/h the ratio of the previous step's lambda-increment to this one's. The first
    step has no history and takes the first-order update (D_{i-1} absent: DDIM for eta = 0, the
    DDPM posterior for eta = 1), and so does the last, to g' = 1, where lambda' is infinite and
    y' is D_i itself (lower_order_final of the reference code).
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"dpmpp_2m_sde: eta must lie in [0, 1] (0: the ODE solver dpmpp_2m, "
                         f"1: the SDE), got {eta!r}")
    a, b, alpha_next, h, m1, noise = _exponential_step(s, eta)
    weight = alpha_next * -torch.expm1(-(1 + eta) * h)
    # r_t = h_{t+1}/h_t: the previous loop step is diffusion step t + 1; none for t = T
    r = torch.full_like(h, math.inf)
    r[:-1] = h[1:] / h[:-1]
    second_order = torch.isfinite(r) & torch.isfinite(h)
    second_order[0] = False                      # t = 1: the final step is first order
    half_inverse_r = torch.where(second_order, 0.5 / r, torch.zeros_like(r))
    m0 = weight * (1 + half_inverse_r)
    m2 = -weight * half_inverse_r
    # the last step: y_0 = D_1 exactly (sigma_next = 0 and h = inf make the terms above 0·inf)
    m0[0], m1[0], m2[0], noise[0] = 1.0, 0.0, 0.0, 0.0
    return _rows(a, b, m0, m1, noise, m2)


def _dpmpp_3m_rows(s: NoiseSchedule, eta: float) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022b, multistep, third order, data prediction), with eta > 0
    its SDE form, over the noise levels of the schedule. Notation of _dpmpp_rows, kappa = 1 + eta,
    u = lambda - lambda_i. The update integrates the x0 estimates' interpolating polynomial in u
    exactly against the exponential integrator's weight kappa·e^(-kappa·(h - u)) on [0, h]:

        y' = (sigma'/sigma)·e^(-eta·h)·y + alpha'·(I0·D_i + I1·c1 + I2·c2)
             + sigma'·sqrt(1 - e^(-2·eta·h))·z,
        I0 = 1 - e^(-kappa·h),  I1 = h - I0/kappa,  I2 = h² - 2h/kappa + 2·I0/kappa²,

    D(u) = D_i + c1·u + c2·u² the quadratic through D_i, D_{i-1} at u = -h_{i-1} and D_{i-2} at
    u = -h_{i-1} - h_{i-2} (Newton form: f1 = (D_i - D_{i-1})/h_{i-1}, f1' = (D_{i-1} -
    D_{i-2})/h_{i-2}, c2 = (f1 - f1')/(h_{i-1} + h_{i-2}), c1 = f1 + c2·h_{i-1}). That is
    third order in h per step for the probability-flow ODE (eta = 0): exact for x0 quadratic in
    lambda. The first step is first order (DDIM, or the DDPM posterior for eta = 1; one network
    evaluation per step leaves no better start), and its O(h²) error bounds the global order by
    2 wherever x0 changes over that step (tests/test_samplers_multistep.py measures 4.1 on
    Gaussian data, where it hardly does, and 2 on a nonlinear stand-in; the SDE form is second
    order in distribution). The second step takes the linear interpolant (c2 = 0), and so does
    the one before the last, where the steps to lambda = inf end (lower_order_final of the
    reference code: a quadratic extrapolated over the steps' widely varying ratios there is
    unstable at few steps); the last step gives y_0 = D_1, as in _dpmpp_rows. m2 and m3 are the weights of D_{i-1} and D_{i-2}.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"dpmpp_3m_sde: eta must lie in [0, 1] (0: the ODE solver dpmpp_3m, "
                         f"1: the SDE), got {eta!r}")
    a, b, alpha_next, h, m1, noise = _exponential_step(s, eta)
    kappa = 1 + eta
    i0 = -torch.expm1(-kappa * h)
    i1 = h - i0 / kappa
    i2 = h.square() - 2 * h / kappa + 2 * i0 / kappa ** 2
    # h_prev[k], h_prev2[k]: the lambda-increments of the one and two loop steps before row k
    # (diffusion steps t + 1 and t + 2; inf where there is none)
    steps = h.shape[0]
    h_prev, h_prev2 = torch.full_like(h, math.inf), torch.full_like(h, math.inf)
    h_prev[:-1], h_prev2[:-2] = h[1:], h[2:]
    loop_step = torch.arange(steps - 1, -1, -1, device=h.device)   # row k is loop step T - 1 - k
    order = (loop_step + 1).clamp(max=3)
    if steps > 1:
        order[1] = order[1].clamp(max=2)         # the step before the last
    zero = torch.zeros_like(h)
    linear = torch.where(order >= 2, i1, zero)
    quadratic = torch.where(order >= 3, (i1 * h_prev + i2) / (h_prev + h_prev2), zero)
    first_difference = (linear + quadratic) / h_prev     # weight of f1·h_prev = D_i - D_{i-1}
    second_difference = quadratic / h_prev2             # weight of f1'·h_prev2 = D_{i-1} - D_{i-2}
    first_difference = torch.where(order >= 2, first_difference, zero)
    second_difference = torch.where(order >= 3, second_difference, zero)
    m0 = alpha_next * (i0 + first_difference)
    m2 = -alpha_next * (first_difference + second_difference)
    m3 = alpha_next * second_difference
    m0[0], m1[0], m2[0], m3[0], noise[0] = 1.0, 0.0, 0.0, 0.0, 0.0
    return _rows(a, b, m0, m1, noise, m2, m3)


def _rows(a, b, m0, m1, sigma, m2=None, m3=None) -> torch.Tensor:
    """(T, 7): the columns of COLUMNS; m2, m3 = 0 where a sampler carries no such history."""
    zeros = torch.zeros_like(a)
    return torch.stack([a, b, m0, m1, sigma, zeros if m2 is None else m2,
                        zeros if m3 is None else m3], dim=1)


def reverse_coefficients(schedule: NoiseSchedule, sampler: str, batch: int,
                         device: torch.device | str = "cpu", *, eta: float | None = None) -> torch.Tensor:
    """The (T, B, 7) float32 table of (a, b, m0, m1, sigma, m2, m3) on `device`, rows in loop order
    (row 0 is step T). sampler: one of SAMPLER_NAMES; eta: the noise scale of the samplers in
    ETA_DEFAULT (None: their default), ignored by the others."""
    rows = _rows_of(schedule, sampler, eta)
    rows = rows.flip(0).to(torch.float32)
    table = rows[:, None, :].expand(-1, batch, -1).contiguous()
    return table.to(device)


def _rows_of(schedule: NoiseSchedule, sampler: str, eta: float | None) -> torch.Tensor:
    """(T, 7) float64 rows in schedule order (row 0 is step 1)."""
    _check_sampling_schedule(schedule)
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    eta = ETA_DEFAULT.get(sampler, 0.0) if eta is None else eta
    if sampler == "sr3":
        return _sr3_rows(schedule)
    if sampler == "posterior":
        return _posterior_rows(schedule)
    if sampler == "ddim":
        return _ddim_rows(schedule, eta)
    if sampler.startswith("dpmpp_3m"):
        return _dpmpp_3m_rows(schedule, 0.0 if sampler == "dpmpp_3m" else eta)
    return _dpmpp_rows(schedule, 0.0 if sampler == "dpmpp_2m" else eta)


def is_stochastic(schedule: NoiseSchedule, sampler: str, eta: float | None = None) -> bool:
    """Whether any step of `sampler` over `schedule` adds noise (sigma > 0): the loops draw no
    noise for the others (DDIM with eta = 0, DPM-Solver++ 2M and 3M)."""
    return bool((_rows_of(schedule, sampler, eta)[:, 4] > 0).any())


def noise_levels(schedule: NoiseSchedule, batch: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (T, B) table of g_t the network is told at each loop step (row 0 is g_T), on `device`."""
    _check_sampling_schedule(schedule)
    levels = schedule.gammas.flip(0).to(dtype)
    return levels[:, None].expand(-1, batch).contiguous().to(device)
