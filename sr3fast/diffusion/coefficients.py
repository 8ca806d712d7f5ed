"""Per-step tables of the reverse process: the contract every SR3 sampling loop consumes.

Each step of every sampler here is the one fused update `sr3fast.ops.reverse_step`:

    x0     = a·y_t - b·eps                 the clean image implied by the predicted noise
    x0     = clamp(x0, -clip, clip)        only for samplers that clip
    y_prev = m0·x0 + m1·y_t + sigma·z      z ~ N(0, I)

with a = 1/sqrt(g_t) and b = sqrt(1/g_t - 1) for every sampler (inverting
y_t = sqrt(g_t)·y_0 + sqrt(1 - g_t)·eps); the samplers differ in m0, m1, sigma and clip.

Contract (the Python samplers and the C++ sampling loop follow it alike):

    coefs  = reverse_coefficients(schedule, sampler, B, device)  # (T, B, 5) float32, contiguous
    gammas = noise_levels(schedule, B, device)                   # (T, B)    float32, contiguous
    y = y_T ~ N(0, I)
    for i in 0 .. T-1:                       # loop step i is diffusion step t = T - i
        eps = f(x, y, gammas[i])             # gammas[i] = g_t, the level the network is told
        y = reverse_step(y, eps, coefs[i], z_i, clip=CLIP[sampler])
                                             # coefs[i] = (a, b, m0, m1, sigma) of step t
                                             # z_i: fresh N(0, I); zeros on the last step
    return y                                 # y_0

Row 0 is step T. The last row (t = 1) has sigma = 0, m0 = 1, m1 = 0, so y_0 is the x0 estimate
itself. Both tables are built once per sampling call: float64 maths on the host, one copy to
the device, so the loop has no Python floats and no host→device copies.
"""
from __future__ import annotations

import torch

from ._checks import check_schedule
from .schedules import POSTERIOR_VARIANCE_FLOOR, NoiseSchedule

SAMPLER_NAMES = ("sr3", "posterior", "ddim")
# the x0 clamp each sampler applies (the public checkpoints were sampled with clip_denoised=True)
CLIP = {"sr3": None, "posterior": 1.0, "ddim": None}


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
    return torch.stack([a, b, s.posterior_mean_coef_x0, s.posterior_mean_coef_yt, sigma], dim=1)


def _posterior_rows(s: NoiseSchedule) -> torch.Tensor:
    """The public SR3 code's p_sample: posterior mean of the clipped x0 and the posterior
    standard deviation exp(0.5·log(max(var, 1e-20))); z = 0 at t = 1."""
    a, b = _x0_from_eps(s)
    sigma = s.posterior_variance.clamp(min=POSTERIOR_VARIANCE_FLOOR).sqrt()
    sigma[0] = 0
    return torch.stack([a, b, s.posterior_mean_coef_x0, s.posterior_mean_coef_yt, sigma], dim=1)


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
    return torch.stack([a, b, m0, direction, sigma], dim=1)


def reverse_coefficients(schedule: NoiseSchedule, sampler: str, batch: int,
                         device: torch.device | str = "cpu", *, eta: float = 0.0) -> torch.Tensor:
    """The (T, B, 5) float32 table of (a, b, m0, m1, sigma) on `device`, rows in loop order
    (row 0 is step T). sampler: one of SAMPLER_NAMES; eta is used by "ddim" only."""
    _check_sampling_schedule(schedule)
    if sampler == "sr3":
        rows = _sr3_rows(schedule)
    elif sampler == "posterior":
        rows = _posterior_rows(schedule)
    elif sampler == "ddim":
        rows = _ddim_rows(schedule, eta)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    rows = rows.flip(0).to(torch.float32)
    table = rows[:, None, :].expand(-1, batch, -1).contiguous()
    return table.to(device)


def noise_levels(schedule: NoiseSchedule, batch: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (T, B) table of g_t the network is told at each loop step (row 0 is g_T), on `device`."""
    _check_sampling_schedule(schedule)
    levels = schedule.gammas.flip(0).to(dtype)
    return levels[:, None].expand(-1, batch).contiguous().to(device)
