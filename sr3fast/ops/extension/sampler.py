"""sr3fast::sample_aoti (csrc/sampler/): a whole SR3 sampling call in C++, the denoiser being an
AOTInductor package. The loop and its tables are those of sr3fast.diffusion (see
sr3fast.diffusion.coefficients): with noise="torch" and the same generator it reproduces the
Python samplers step for step.

    package = sr3fast.export.export_denoiser(model, x, "d.pt2")  # once, slow (compiles)
    coefs = reverse_coefficients(schedule, "posterior", B, device)
    gammas = noise_levels(schedule, B, device)
    y0 = sample_aoti(package, x, y_T, coefs, gammas, clip=CLIP["posterior"], generator=g)
"""
from __future__ import annotations

import torch

import sr3fast._C  # noqa: F401  (registers torch.ops.sr3fast.*)

from ._layout import kernel_layout

NOISE_SOURCES = ("torch", "kernel")


@torch.library.register_fake("sr3fast::sample_aoti")
def _sample_aoti_fake(denoiser, x, y_T, coefs, gammas, clip=None, stochastic=True,
                      kernel_noise=False, generator=None, multistep=False):
    return torch.empty_like(kernel_layout(y_T), dtype=torch.float32)


def sample_aoti(denoiser: str, x: torch.Tensor, y_T: torch.Tensor, coefs: torch.Tensor,
                gammas: torch.Tensor, *, clip: float | None = None, stochastic: bool = True,
                noise: str = "torch", generator: torch.Generator | None = None,
                multistep: bool = False) -> torch.Tensor:
    """y_0 (float32) after every step of the sampler whose tables are coefs (T, B, 6) (or the
    older (T, B, 5) when not multistep) and gammas (T, B); denoiser: path of a package from
    sr3fast.export. stochastic=False for samplers that add no noise (DDIM, eta = 0); noise:
    "torch" (z from torch.randn, as the Python samplers draw it) or "kernel" (z drawn inside
    reverse_step); multistep=True for multistep solvers (DPM-Solver++ 2M): each step runs
    reverse_step_multistep with the previous step's x0 estimate (zeros before the first)."""
    if noise not in NOISE_SOURCES:
        raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
    return torch.ops.sr3fast.sample_aoti(str(denoiser), x, y_T, coefs, gammas, clip, stochastic,
                                         noise == "kernel", generator, bool(multistep))
