"""reverse_step: x0 = a·y_t − b·eps, optional clamp, y_prev = m0·x0 + m1·y_t [+ m2·x0_prev] + sigma·z."""
from __future__ import annotations

import torch

from ._dispatch import implementation


def reverse_step(y_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                 noise: torch.Tensor | None = None, clip: float | None = None,
                 generator: torch.Generator | None = None, x0_prev: torch.Tensor | None = None):
    """One reverse-diffusion update; see sr3fast.reference.reverse_step for the maths.

    y_t, eps: (B, *); coefs: (B, 5) float32 (a, b, m0, m1, sigma) per sample, or (B, 6) with
    m2 last, on y_t's device; noise: z, same shape as y_t, or None to draw it (fused backends
    draw it in-kernel). x0_prev: the previous step's x0 (multistep samplers), shaped like y_t;
    coefs must then be (B, 6). Returns y_prev, or (y_prev, x0) when x0_prev is given.
    """
    if eps.shape != y_t.shape:
        raise ValueError(f"reverse_step: eps {tuple(eps.shape)} must match y_t {tuple(y_t.shape)}")
    widths = (6,) if x0_prev is not None else (5, 6)
    if coefs.dim() != 2 or coefs.shape[0] != y_t.shape[0] or coefs.shape[1] not in widths \
            or coefs.dtype != torch.float32:
        held = "(a, b, m0, m1, sigma, m2)" if x0_prev is not None else "(a, b, m0, m1, sigma[, m2])"
        raise ValueError(f"reverse_step: coefs must be a float32 tensor of shape (B, "
                         f"{' or '.join(map(str, widths))}) holding {held} per sample"
                         f"{' (x0_prev needs the m2 column)' if x0_prev is not None else ''}; "
                         f"got {coefs.dtype} {tuple(coefs.shape)}")
    if coefs.device != y_t.device:
        raise ValueError(f"reverse_step: coefs are on {coefs.device} but y_t on {y_t.device}; "
                         "precompute the coefficient table on the sampling device")
    if noise is not None and noise.shape != y_t.shape:
        raise ValueError(f"reverse_step: noise {tuple(noise.shape)} must match y_t {tuple(y_t.shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"reverse_step: clip must be positive or None, got {clip}")
    run = implementation("reverse_step", y_t.device)
    if x0_prev is None:
        return run(y_t, eps, coefs, noise, clip, generator)
    if x0_prev.shape != y_t.shape or x0_prev.device != y_t.device:
        raise ValueError(f"reverse_step: x0_prev {tuple(x0_prev.shape)} on {x0_prev.device} must "
                         f"match y_t {tuple(y_t.shape)} on {y_t.device}")
    return run(y_t, eps, coefs, noise, clip, generator, x0_prev=x0_prev)
