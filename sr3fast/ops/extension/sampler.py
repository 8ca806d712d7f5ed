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
                      kernel_noise=False, generator=None, history=0):
    return torch.empty_like(kernel_layout(y_T), dtype=torch.float32)


def sample_aoti(denoiser: str, x: torch.Tensor, y_T: torch.Tensor, coefs: torch.Tensor,
                gammas: torch.Tensor, *, clip: float | None = None, stochastic: bool = True,
                noise: str = "torch", generator: torch.Generator | None = None,
                history: int = 0) -> torch.Tensor:
    """y_0 (float32) after every step of the sampler whose tables are coefs (T, B, 7) (or the
    older (T, B, 5|6) where the history does not read the missing columns) and gammas (T, B);
    denoiser: path of a package from sr3fast.export. stochastic=False for samplers that add no
    noise (DDIM, eta = 0); noise: "torch" (z from torch.randn, as the Python samplers draw it) or
    "kernel" (z drawn inside reverse_step); history: how many past x0 estimates each step carries
    (sr3fast.diffusion.HISTORY: 1 for DPM-Solver++ 2M, 2 for 3M, 0 for single-step samplers),
    zeros before the first step."""
    if noise not in NOISE_SOURCES:
        raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
    if isinstance(history, bool) or history not in (0, 1, 2):
        raise ValueError(f"history must be 0, 1 or 2 (past x0 estimates each step carries, "
                         f"sr3fast.diffusion.HISTORY), got {history!r}")
    return torch.ops.sr3fast.sample_aoti(str(denoiser), x, y_T, coefs, gammas, clip, stochastic,
                                         noise == "kernel", generator, int(history))
