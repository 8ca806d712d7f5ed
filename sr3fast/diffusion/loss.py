"""The SR3 training objective: Algorithm 1 of Saharia et al. (2021).

    t ~ U{1, ..., T},  g ~ U(g_t, g_{t-1}),  e ~ N(0, I)
    y~ = sqrt(g)·y_0 + sqrt(1 - g)·e
    loss = || f(x, y~, g) - e ||_p,   p in {1, 2}

Sampling g continuously between the table's levels (a piecewise-uniform p(g)) is what lets any
noise schedule be used at inference without retraining.
"""
from __future__ import annotations

import torch

from ._checks import check_generator, check_schedule
from .schedules import NoiseSchedule

GAMMA_METHODS = ("paper", "public")
LOSSES = ("l1", "l2")


def sample_gamma(schedule: NoiseSchedule, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", *, method: str = "paper") -> torch.Tensor:
    """Noise levels g for one training batch: (batch,) on `device`, float64 (float32 on MPS).

    method="paper" (Algorithm 1): per sample, t ~ U{1..T} then g ~ U(g_t, g_{t-1}), g_0 = 1.
    method="public": as the public SR3 code trains, one t ~ U{1..T} for the whole batch, then
    per sample sqrt(g) ~ U(sqrt(g_t), sqrt(g_{t-1})).

    Draws, in order, t (torch.randint) then u (torch.rand) from `generator`, which must live
    on `device`; nothing is copied from the host.
    """
    check_schedule(schedule, "sample_gamma")
    if method not in GAMMA_METHODS:
        raise ValueError(f"sample_gamma: unknown method {method!r}; choose one of {GAMMA_METHODS}")
    device = torch.device(device)
    check_generator(generator, device, "sample_gamma")
    table = schedule.gamma_table(device)  # [g_0, ..., g_T]
    steps = batch if method == "paper" else 1
    t = torch.randint(1, schedule.num_steps + 1, (steps,), generator=generator, device=device)
    u = torch.rand(batch, generator=generator, device=device, dtype=table.dtype)
    if method == "public":
        table = table.sqrt()
    low, high = table[t], table[t - 1]  # g_t <= g_{t-1}
    level = high - u * (high - low)
    return level if method == "paper" else level.square()


def diffusion_loss(model, x: torch.Tensor, y0: torch.Tensor, schedule: NoiseSchedule,
                   loss: str = "l1", generator: torch.Generator | None = None, *,
                   gamma_method: str = "paper", gamma: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 1: the mean over all elements of |f(x, y~, g) - e|^p, a scalar.

    x: (B, C, H, W) upsampled low-resolution condition; y0: the target, same batch, in [-1, 1];
    model.predict_noise(x, y~, gamma) is f. gamma (B,) and noise (like y0) may be given;
    otherwise they are drawn from `generator` (on y0's device), gamma first
    (see sample_gamma(method=gamma_method)), then noise with torch.randn.

    The noisy target is formed in float64 coefficients cast to y0's dtype; the model receives
    gamma as float32 (float64 when y0 is float64).
    """
    if loss not in LOSSES:
        raise ValueError(f"diffusion_loss: unknown loss {loss!r}; choose one of {LOSSES}")
    if y0.dim() < 2 or x.shape[0] != y0.shape[0]:
        raise ValueError(f"diffusion_loss: x {tuple(x.shape)} and y0 {tuple(y0.shape)} must be "
                         "batches (B, C, ...) of the same size B")
    batch, device = y0.shape[0], y0.device
    check_generator(generator, device, "diffusion_loss")
    if gamma is None:
        gamma = sample_gamma(schedule, batch, generator, device, method=gamma_method)
    elif tuple(gamma.shape) != (batch,) or gamma.device != device:
        raise ValueError(f"diffusion_loss: gamma must have shape ({batch},) on {device}, "
                         f"got {tuple(gamma.shape)} on {gamma.device}")
    if noise is None:
        noise = torch.randn(y0.shape, generator=generator, device=device, dtype=y0.dtype)
    elif noise.shape != y0.shape:
        raise ValueError(f"diffusion_loss: noise {tuple(noise.shape)} must match y0 {tuple(y0.shape)}")

    level = gamma.reshape(batch, *([1] * (y0.dim() - 1)))
    level = level.to(torch.promote_types(level.dtype, torch.float32))
    y_noisy = level.sqrt().to(y0.dtype) * y0 + (1 - level).sqrt().to(y0.dtype) * noise
    model_gamma = gamma.to(torch.promote_types(y0.dtype, torch.float32))
    error = model.predict_noise(x, y_noisy, model_gamma) - noise
    return error.abs().mean() if loss == "l1" else error.square().mean()
