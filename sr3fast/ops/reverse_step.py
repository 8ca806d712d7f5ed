"""reverse_step: x0 = a·y_t − b·eps, optional clamp, y_prev = m0·x0 + m1·y_t + sigma·z."""
from __future__ import annotations

import torch

from ._dispatch import implementation


def reverse_step(y_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                 noise: torch.Tensor | None = None, clip: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One reverse-diffusion update; see sr3fast.reference.reverse_step for the maths.

    y_t, eps: (B, *); coefs: (B, 5) float32 (a, b, m0, m1, sigma) per sample, on y_t's device;
    noise: z, same shape as y_t, or None to draw it (fused backends draw it in-kernel).
    """
    if eps.shape != y_t.shape:
        raise ValueError(f"reverse_step: eps {tuple(eps.shape)} must match y_t {tuple(y_t.shape)}")
    if coefs.shape != (y_t.shape[0], 5) or coefs.dtype != torch.float32:
        raise ValueError("reverse_step: coefs must be a float32 tensor of shape (B, 5) holding "
                         f"(a, b, m0, m1, sigma) per sample; got {coefs.dtype} {tuple(coefs.shape)}")
    if coefs.device != y_t.device:
        raise ValueError(f"reverse_step: coefs are on {coefs.device} but y_t on {y_t.device}; "
                         "precompute the coefficient table on the sampling device")
    if noise is not None and noise.shape != y_t.shape:
        raise ValueError(f"reverse_step: noise {tuple(noise.shape)} must match y_t {tuple(y_t.shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"reverse_step: clip must be positive or None, got {clip}")
    return implementation("reverse_step", y_t.device)(y_t, eps, coefs, noise, clip, generator)
