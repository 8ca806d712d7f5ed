"""SR3's diffusion process: noise schedules, the training loss (Algorithm 1), samplers.

    schedule = NoiseSchedule.from_config(model.config.schedule)     # or NoiseSchedule(betas)
    loss = diffusion_loss(model, x, y0, schedule, loss="l1")         # Algorithm 1
    y0 = sample("posterior", model, x, respace(schedule, 100), generator=g)
    y0 = sample("posterior", model, x, schedule, generator=g, loop="cpp")   # steps in C++

The per-step tables the samplers run on (`reverse_coefficients`, `noise_levels`) are the
contract shared with the C++ sampling loop; see sr3fast.diffusion.coefficients.
"""
from .coefficients import (CLIP, HISTORY, MULTISTEP, SAMPLER_NAMES, log_snr, noise_levels,
                           reverse_coefficients)
from .loops import LOOPS
from .loss import diffusion_loss, sample_gamma
from .samplers import (SAMPLERS, sample, sample_ddim, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                       sample_dpmpp_3m, sample_dpmpp_3m_sde, sample_posterior, sample_sr3)
from .schedules import SCHEDULES, NoiseSchedule, make_betas, respace, respace_log_snr, truncate

__all__ = [
    "CLIP", "HISTORY", "LOOPS", "MULTISTEP", "SAMPLERS", "SAMPLER_NAMES", "SCHEDULES", "NoiseSchedule",
    "diffusion_loss", "log_snr", "make_betas", "noise_levels", "respace", "respace_log_snr", "truncate",
    "reverse_coefficients", "sample", "sample_ddim", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m", "sample_dpmpp_3m_sde",    "sample_gamma", "sample_posterior", "sample_sr3",
]
