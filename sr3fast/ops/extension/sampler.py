"""sr3fast::sample_aoti (csrc/sampler/): a whole SR3 sampling call in C++, the denoiser being an
AOTInductor package. The loop and its tables are those of sr3fast.diffusion (see
sr3fast.diffusion.coefficients): with noise="torch" and the same generator it reproduces the
Python samplers step for step.

    package = export_denoiser(model, x, "denoiser.pt2")          # once, slow (compiles)
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
                      kernel_noise=False, generator=None):
    return torch.empty_like(kernel_layout(y_T), dtype=torch.float32)


class _PredictNoise(torch.nn.Module):
    """model.predict_noise(x, y_t, gamma) as a module's forward, for torch.export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y_t, gamma):
        return self.model.predict_noise(x, y_t, gamma)


def export_denoiser(model, x: torch.Tensor, package_path: str) -> str:
    """Compiles model.predict_noise for inputs shaped like x (and gamma (B,) float32) into an
    AOTInductor package at package_path; returns the path. model: anything with
    predict_noise(x, y_t, gamma) -> eps, on x's device and in x's dtype."""
    gamma = torch.full((x.shape[0],), 0.5, device=x.device)
    with torch.no_grad():
        program = torch.export.export(_PredictNoise(model).eval(), (x, x.clone(), gamma))
        return torch._inductor.aoti_compile_and_package(program, package_path=package_path)


def sample_aoti(denoiser: str, x: torch.Tensor, y_T: torch.Tensor, coefs: torch.Tensor,
                gammas: torch.Tensor, *, clip: float | None = None, stochastic: bool = True,
                noise: str = "torch", generator: torch.Generator | None = None) -> torch.Tensor:
    """y_0 (float32) after every step of the sampler whose tables are coefs (T, B, 5) and
    gammas (T, B); denoiser: path of a package from export_denoiser. stochastic=False for
    samplers that add no noise (DDIM, eta = 0); noise: "torch" (z from torch.randn, as the Python
    samplers draw it) or "kernel" (z drawn inside reverse_step)."""
    if noise not in NOISE_SOURCES:
        raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
    return torch.ops.sr3fast.sample_aoti(str(denoiser), x, y_T, coefs, gammas, clip, stochastic,
                                         noise == "kernel", generator)
