"""reverse_step: x0 = a·y_t − b·eps, optional clamp,
y_prev = m0·x0 + m1·y_t [+ m2·x0_prev [+ m3·x0_prev2]] + sigma·z."""
from __future__ import annotations

import torch

from ._dispatch import implementation


def reverse_step(y_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                 noise: torch.Tensor | None = None, clip: float | None = None,
                 generator: torch.Generator | None = None, x0_prev: torch.Tensor | None = None,
                 x0_prev2: torch.Tensor | None = None):
    """One reverse-diffusion update; see sr3fast.reference.reverse_step for the maths.

    y_t, eps: (B, *); coefs: (B, 5) float32 (a, b, m0, m1, sigma) per sample, (B, 6) with m2
    next or (B, 7) with m2, m3, on y_t's device; noise: z, same shape as y_t, or None to draw it
    (fused backends draw it in-kernel). x0_prev: the previous step's x0 (multistep samplers),
    shaped like y_t, coefs then (B, 6) or (B, 7); x0_prev2: the x0 of the step before that
    (three-step solvers), needs x0_prev, its dtype, and coefs (B, 7). Returns y_prev, or
    (y_prev, x0) when x0_prev is given.
    """
    if eps.shape != y_t.shape:
        raise ValueError(f"reverse_step: eps {tuple(eps.shape)} must match y_t {tuple(y_t.shape)}")
    history = 0 if x0_prev is None else (1 if x0_prev2 is None else 2)
    widths = (5, 6, 7)[history:]
    if coefs.dim() != 2 or coefs.shape[0] != y_t.shape[0] or coefs.shape[1] not in widths \
            or coefs.dtype != torch.float32:
        held = ("(a, b, m0, m1, sigma[, m2[, m3]])", "(a, b, m0, m1, sigma, m2[, m3])",
                "(a, b, m0, m1, sigma, m2, m3)")[history]
        needs = ("", " (x0_prev needs the m2 column)", " (x0_prev2 needs the m3 column)")[history]
        raise ValueError(f"reverse_step: coefs must be a float32 tensor of shape (B, "
                         f"{' or '.join(map(str, widths))}) holding {held} per sample{needs}; "
                         f"got {coefs.dtype} {tuple(coefs.shape)}")
    if coefs.device != y_t.device:
        raise ValueError(f"reverse_step: coefs are on {coefs.device} but y_t on {y_t.device}; "
                         "precompute the coefficient table on the sampling device")
    if noise is not None and noise.shape != y_t.shape:
        raise ValueError(f"reverse_step: noise {tuple(noise.shape)} must match y_t {tuple(y_t.shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"reverse_step: clip must be positive or None, got {clip}")
    if x0_prev2 is not None and x0_prev is None:
        raise ValueError("reverse_step: x0_prev2 (the x0 of two steps back) needs x0_prev (the "
                         "previous step's x0) as well")
    run = implementation("reverse_step", y_t.device)
    if x0_prev is None:
        return run(y_t, eps, coefs, noise, clip, generator)
    for name, past in (("x0_prev", x0_prev), ("x0_prev2", x0_prev2)):
        if past is not None and (past.shape != y_t.shape or past.device != y_t.device):
            raise ValueError(f"reverse_step: {name} {tuple(past.shape)} on {past.device} must "
                             f"match y_t {tuple(y_t.shape)} on {y_t.device}")
    if x0_prev2 is None:
        return run(y_t, eps, coefs, noise, clip, generator, x0_prev=x0_prev)
    if x0_prev2.dtype != x0_prev.dtype:
        raise ValueError(f"reverse_step: x0_prev2 ({x0_prev2.dtype}) must have x0_prev's dtype "
                         f"({x0_prev.dtype}): both are earlier steps' x0 outputs")
    return run(y_t, eps, coefs, noise, clip, generator, x0_prev=x0_prev, x0_prev2=x0_prev2)
