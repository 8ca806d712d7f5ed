"""sr3fast::reverse_step and sr3fast::reverse_step_multistep (csrc/reverse_step/): fake kernels
and the backend function."""
from __future__ import annotations

import torch

import sr3fast._C  # noqa: F401  (registers torch.ops.sr3fast.*)

from ._layout import kernel_layout


@torch.library.register_fake("sr3fast::reverse_step")
def _reverse_step_fake(y_t, eps, coefs, noise=None, clip=None, generator=None):
    return torch.empty_like(kernel_layout(y_t))


@torch.library.register_fake("sr3fast::reverse_step_multistep")
def _reverse_step_multistep_fake(y_t, eps, coefs, x0_prev, noise=None, clip=None, generator=None,
                                 x0_prev2=None):
    layout = kernel_layout(y_t)
    return torch.empty_like(layout), torch.empty_like(layout)


def reverse_step(y_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                 noise: torch.Tensor | None = None, clip: float | None = None,
                 generator: torch.Generator | None = None,
                 x0_prev: torch.Tensor | None = None, x0_prev2: torch.Tensor | None = None):
    """One fused reverse-diffusion update; see sr3fast.reference.reverse_step.

    Without x0_prev: sr3fast::reverse_step, returns y_prev (coefs (B, 5), (B, 6) or (B, 7); m2 and
    m3 unread). With x0_prev (multistep samplers; coefs (B, 6) or (B, 7), m3 unread):
    sr3fast::reverse_step_multistep, returns (y_prev, x0), y_prev = ((m0·x0 + m1·y_t) +
    m2·x0_prev) + sigma·z and x0 this step's clamped estimate in y_t's dtype and layout, the next
    step's x0_prev. With x0_prev2 as well (DPM-Solver++ 3M; coefs (B, 7); x0_prev2 in x0_prev's
    dtype): y_prev = (((m0·x0 + m1·y_t) + m2·x0_prev) + m3·x0_prev2) + sigma·z.

    Without `noise`, z is drawn inside the op, the same way by both ops: on CPU exactly as the
    reference draws it (same generator, same values); on CUDA in-kernel with Philox from the
    generator's CUDA-graph-safe state, so a captured sampling loop replays with fresh noise.
    """
    if x0_prev is None:
        if x0_prev2 is not None:
            raise ValueError("reverse_step: x0_prev2 (the x0 of two steps back) needs x0_prev "
                             "(the previous step's) as well")
        return torch.ops.sr3fast.reverse_step(y_t, eps, coefs, noise, clip, generator)
    y_prev, x0 = torch.ops.sr3fast.reverse_step_multistep(y_t, eps, coefs, x0_prev, noise, clip,
                                                          generator, x0_prev2)
    return y_prev, x0
