"""SR3 samplers: small loops over the precomputed tables of sr3fast.diffusion.coefficients.

    sample_sr3        Algorithm 2 of the paper (variance 1 - a_t)
    sample_posterior  x0 clipped to [-1, 1], posterior variance: how the public checkpoints sample
    sample_ddim       DDIM (Song et al. 2021), eta = 0 deterministic
    sample_dpmpp_2m   DPM-Solver++(2M) (Lu et al. 2022b), multistep, second order, deterministic
    sample_dpmpp_2m_sde  its SDE form (SDE-DPM-Solver++(2M)), eta = 1 by default
    sample_dpmpp_3m   DPM-Solver++(3M), multistep, third order, deterministic
    sample_dpmpp_3m_sde  its SDE form, eta = 1 by default

All share one signature, (model, x, schedule, *, y_T, generator, noise, callback, progress, loop,
package), and one setup (`_run`): per step, eps = model.predict_noise(x, y_t, g_t), then the fused
`sr3fast.ops.reverse_step` with that step's row of the coefficient table; see
sr3fast.diffusion.coefficients for the table contract. loop= picks where the steps run: "python",
"cpp" or "graph" (sr3fast.diffusion.loops). package= (a package from `sr3fast export`, opened
by sr3fast.export.open_package) replaces model.predict_noise with the AOTInductor-compiled U-Net;
model may then be None.

Randomness: y_T ~ N(0, I) is drawn from `generator` (unless given as y_T=). With
noise="torch", each step's z is drawn with torch.randn(..., generator=generator) on x's device
and handed to reverse_step, so a seed gives the same image on every backend. With
noise="kernel", reverse_step gets noise=None and the generator, and a fused backend draws z
in-kernel (faster, but the image then depends on the backend). Steps that add no noise
(the last one; every step of DDIM with eta = 0 and of DPM-Solver++ 2M and 3M) get zeros in both
modes.

Multistep samplers (DPM-Solver++) also carry past x0 estimates from step to step: 2M the previous
step's (coefficient m2 of the table), 3M that and the one before it (m3); every loop carries them
the same way.

The sampling state y is float32 whatever the model's dtype (a long chain of bf16 updates would
lose the image); the model sees y cast to x's dtype. The result is y_0, float32, in [-1, 1].
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from ._checks import check_generator
from .coefficients import CLIP, HISTORY, is_stochastic, noise_levels, reverse_coefficients
from .loops import (LOOPS, NOISE_SOURCES, STATE_DTYPE, SamplingRun, denoiser_for, run_cpp, run_graph,
                    run_python)
from .schedules import NoiseSchedule

def _initial_noise(x: torch.Tensor, y_T: torch.Tensor | None,
                   generator: torch.Generator | None) -> torch.Tensor:
    if y_T is None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=STATE_DTYPE)
    if y_T.shape != x.shape or y_T.device != x.device:
        raise ValueError(f"y_T must match x: shape {tuple(x.shape)} on {x.device}; "
                         f"got {tuple(y_T.shape)} on {y_T.device}")
    return y_T.to(STATE_DTYPE, copy=True)


def _run(model, x: torch.Tensor, schedule: NoiseSchedule, sampler: str, *, eta: float | None = None,
         clip: float | None, y_T: torch.Tensor | None, generator: torch.Generator | None,
         noise: str, callback: Callable | None, progress: bool, loop: str, package) -> torch.Tensor:
    """The setup every sampler shares (the contract in sr3fast.diffusion.coefficients), then the
    steps in the chosen loop (sr3fast.diffusion.loops)."""
    if noise not in NOISE_SOURCES:
        raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be the upsampled condition, shape (B, C, H, W); got {tuple(x.shape)}")
    check_generator(generator, x.device, f"sample_{sampler}")
    if isinstance(package, (str, os.PathLike)):
        raise TypeError(f"sample_{sampler}: package= takes an opened package, "
                        f"sr3fast.export.open_package({str(package)!r}, model=model), not a path: "
                        "the sampling loops read no files (sr3fast.upscale(package=path) opens it)")
    if package is None and model is None:
        raise ValueError(f"sample_{sampler} needs a model (or package=, a package from `sr3fast export` "
                         "opened by sr3fast.export.open_package)")
    denoiser = denoiser_for(package if package is not None else model, x, loop)
    batch, device = x.shape[0], x.device
    run = SamplingRun(x=x, y_T=_initial_noise(x, y_T, generator),
                      coefs=reverse_coefficients(schedule, sampler, batch, device, eta=eta),
                      gammas=noise_levels(schedule, batch, device), clip=clip,
                      stochastic=is_stochastic(schedule, sampler, eta),
                      history=HISTORY.get(sampler, 0), noise=noise, generator=generator)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=run.steps, desc=f"SR3 {sampler} sampling ({loop} loop)", unit="step")
        callback = _with_progress(bar, callback)
    try:
        return LOOP_RUNNERS[loop](denoiser, run, callback)
    finally:
        if bar is not None:
            bar.close()


def _with_progress(bar, callback: Callable | None) -> Callable:
    def advance(i: int, y: torch.Tensor) -> None:
        bar.update(1)
        if callback is not None:
            callback(i, y)
    return advance


LOOP_RUNNERS = {"python": run_python, "cpp": run_cpp, "graph": run_graph}


@torch.no_grad()
def sample_sr3(model, x: torch.Tensor, schedule: NoiseSchedule, *, y_T: torch.Tensor | None = None,
               generator: torch.Generator | None = None, noise: str = "torch",
               callback: Callable | None = None, progress: bool = False, loop: str = "python",
               package=None) -> torch.Tensor:
    """Algorithm 2 of Saharia et al. (2021): y_T ~ N(0, I), then for t = T..1

        y_{t-1} = (1/sqrt(a_t))·(y_t - (1 - a_t)/sqrt(1 - g_t)·f(x, y_t, g_t)) + sqrt(1 - a_t)·z,

    z ~ N(0, I), z = 0 at t = 1: the posterior mean of eq. 11 with the x0 estimate substituted,
    and variance 1 - a_t. No clipping.

    x: (B, C, H, W) upsampled condition; callback(i, y) after loop step i (y = y_{T-1-i}).
    """
    return _run(model, x, schedule, "sr3", clip=CLIP["sr3"], y_T=y_T, generator=generator,
                noise=noise, callback=callback, progress=progress, loop=loop, package=package)


@torch.no_grad()
def sample_posterior(model, x: torch.Tensor, schedule: NoiseSchedule, *, clip: float | None = 1.0,
                     y_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     noise: str = "torch", callback: Callable | None = None,
                     progress: bool = False, loop: str = "python", package=None) -> torch.Tensor:
    """Ancestral DDPM sampling as the public SR3 code does it (p_sample, clip_denoised=True):

        x0      = clamp(y_t/sqrt(g_t) - sqrt(1/g_t - 1)·f(x, y_t, g_t), -clip, clip)
        y_{t-1} = sqrt(g_{t-1}) b_t/(1 - g_t)·x0 + sqrt(a_t)(1 - g_{t-1})/(1 - g_t)·y_t
                  + exp(0.5·log(max(s_t², 1e-20)))·z,   s_t² = (1 - g_{t-1}) b_t/(1 - g_t),

    z ~ N(0, I), z = 0 at t = 1: the exact posterior q(y_{t-1} | y_t, x0) around the clipped
    estimate. clip=None disables the clamp.

    x: (B, C, H, W) upsampled condition; callback(i, y) after loop step i (y = y_{T-1-i}).
    """
    return _run(model, x, schedule, "posterior", clip=clip, y_T=y_T, generator=generator,
                noise=noise, callback=callback, progress=progress, loop=loop, package=package)


@torch.no_grad()
def sample_ddim(model, x: torch.Tensor, schedule: NoiseSchedule, *, eta: float = 0.0,
                clip: float | None = None, y_T: torch.Tensor | None = None,
                generator: torch.Generator | None = None, noise: str = "torch",
                callback: Callable | None = None, progress: bool = False, loop: str = "python",
                package=None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) over the schedule's noise levels, for t = T..1:

        x0      = y_t/sqrt(g_t) - sqrt(1/g_t - 1)·f(x, y_t, g_t)   (clamped when clip is given)
        y_{t-1} = sqrt(g_{t-1})·x0 + sqrt(1 - g_{t-1} - s_t²)·eps + s_t·z,
        s_t     = eta·sqrt((1 - g_{t-1})/(1 - g_t))·sqrt(1 - g_t/g_{t-1}),

    with eps = (y_t - sqrt(g_t)·x0)/sqrt(1 - g_t) taken from the (clipped) x0. eta = 0 is
    deterministic given y_T; eta = 1 has the DDPM posterior variance. Use it with a respaced
    schedule (sr3fast.diffusion.respace) to sample in few steps.

    x: (B, C, H, W) upsampled condition; callback(i, y) after loop step i (y = y_{T-1-i}).
    """
    return _run(model, x, schedule, "ddim", eta=eta, clip=clip, y_T=y_T, generator=generator,
                noise=noise, callback=callback, progress=progress, loop=loop, package=package)


@torch.no_grad()
def sample_dpmpp_2m(model, x: torch.Tensor, schedule: NoiseSchedule, *, clip: float | None = 1.0,
                    y_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    noise: str = "torch", callback: Callable | None = None, progress: bool = False,
                    loop: str = "python", package=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) over the schedule's noise levels, in
    half-log-SNR time lambda = 0.5·log(g/(1 - g)). With alpha = sqrt(g), sigma = sqrt(1 - g),
    D_i the (clipped) x0 estimate at step i and h = lambda_{i+1} - lambda_i:

        y_{i+1} = (sigma_{i+1}/sigma_i)·y_i + alpha_{i+1}·(1 - e^(-h))·((1 + 1/(2r))·D_i - D_{i-1}/(2r)),

    r = h_{i-1}/h; the first and the last step are first order (DDIM). Deterministic given y_T.
    A second-order solver of the probability-flow ODE: with a respaced schedule it samples in
    10-25 steps (sr3fast.diffusion.respace). clip=None disables the clamp of D_i.

    x: (B, C, H, W) upsampled condition; callback(i, y) after loop step i (y = y_{T-1-i}).
    """
    return _run(model, x, schedule, "dpmpp_2m", clip=clip, y_T=y_T, generator=generator,
                noise=noise, callback=callback, progress=progress, loop=loop, package=package)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x: torch.Tensor, schedule: NoiseSchedule, *, eta: float = 1.0,
                        clip: float | None = 1.0, y_T: torch.Tensor | None = None,
                        generator: torch.Generator | None = None, noise: str = "torch",
                        callback: Callable | None = None, progress: bool = False,
                        loop: str = "python", package=None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b; the "midpoint" form of k-diffusion's
    sample_dpmpp_2m_sde), with the notation of sample_dpmpp_2m:

        y_{i+1} = (sigma_{i+1}/sigma_i)·e^(-eta·h)·y_i
                  + alpha_{i+1}·(1 - e^(-(1 + eta)·h))·((1 + 1/(2r))·D_i - D_{i-1}/(2r))
                  + sigma_{i+1}·sqrt(1 - e^(-2·eta·h))·z,

    z ~ N(0, I). eta = 1 solves the reverse SDE (its first-order step is exactly the DDPM
    posterior step); eta = 0 is sample_dpmpp_2m. The fresh noise of each step keeps re-drawing
    detail, which ancestral samplers have and ODE solvers lose at few steps.

    x: (B, C, H, W) upsampled condition; callback(i, y) after loop step i (y = y_{T-1-i}).
    """
    return _run(model, x, schedule, "dpmpp_2m_sde", eta=eta, clip=clip, y_T=y_T,
                generator=generator, noise=noise, callback=callback, progress=progress, loop=loop,
                package=package)

@torch.no_grad()
def sample_dpmpp_3m(model, x: torch.Tensor, schedule: NoiseSchedule, *, clip: float | None = 1.0,
                    y_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    noise: str = "torch", callback: Callable | None = None, progress: bool = False,
                    loop: str = "python", package=None) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022b: multistep, third order, data prediction) over the
    schedule's noise levels, in half-log-SNR time lambda. With the notation of sample_dpmpp_2m,
    each step integrates the quadratic through the x0 estimates D_i, D_{i-1}, D_{i-2} (at their
    lambdas) exactly against the exponential integrator:

        y_{i+1} = (sigma_{i+1}/sigma_i)·y_i + alpha_{i+1}·(I0·D_i + I1·c1 + I2·c2),

    D(u) = D_i + c1·u + c2·u² in u = lambda - lambda_i, I0 = 1 - e^(-h), I1 = h - I0,
    I2 = h² - 2h + 2·I0 (sr3fast.diffusion.coefficients._dpmpp_3m_rows has the derivation). The
    first step is first order (DDIM), the second and the one before the last second order, the
    last gives y_0 = D. Deterministic given y_T; clip=None disables the clamp of D_i.

    x: (B, C, H, W) upsampled condition; callback(i, y) after loop step i (y = y_{T-1-i}).
    """
    return _run(model, x, schedule, "dpmpp_3m", clip=clip, y_T=y_T, generator=generator,
                noise=noise, callback=callback, progress=progress, loop=loop, package=package)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x: torch.Tensor, schedule: NoiseSchedule, *, eta: float = 1.0,
                        clip: float | None = 1.0, y_T: torch.Tensor | None = None,
                        generator: torch.Generator | None = None, noise: str = "torch",
                        callback: Callable | None = None, progress: bool = False,
                        loop: str = "python", package=None) -> torch.Tensor:
    """SDE-DPM-Solver++(3M): sample_dpmpp_3m for the reverse SDE with noise scale eta. With
    kappa = 1 + eta the weight kappa·e^(-kappa·(h - u)) replaces e^(-(h - u)):

        y_{i+1} = (sigma_{i+1}/sigma_i)·e^(-eta·h)·y_i + alpha_{i+1}·(I0·D_i + I1·c1 + I2·c2)
                  + sigma_{i+1}·sqrt(1 - e^(-2·eta·h))·z,
        I0 = 1 - e^(-kappa·h), I1 = h - I0/kappa, I2 = h² - 2h/kappa + 2·I0/kappa²,

    z ~ N(0, I). eta = 1 solves the reverse SDE (its first step is the DDPM posterior step);
    eta = 0 is sample_dpmpp_3m.

    x: (B, C, H, W) upsampled condition; callback(i, y) after loop step i (y = y_{T-1-i}).
    """
    return _run(model, x, schedule, "dpmpp_3m_sde", eta=eta, clip=clip, y_T=y_T,
                generator=generator, noise=noise, callback=callback, progress=progress, loop=loop,
                package=package)


SAMPLERS = {"sr3": sample_sr3, "posterior": sample_posterior, "ddim": sample_ddim,
            "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_sde": sample_dpmpp_2m_sde,
            "dpmpp_3m": sample_dpmpp_3m, "dpmpp_3m_sde": sample_dpmpp_3m_sde}


def sample(name: str, model, x: torch.Tensor, schedule: NoiseSchedule, **kwargs) -> torch.Tensor:
    """Run sampler `name` (a key of SAMPLERS) with its keyword arguments."""
    sampler = SAMPLERS.get(name)
    if sampler is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return sampler(model, x, schedule, **kwargs)
