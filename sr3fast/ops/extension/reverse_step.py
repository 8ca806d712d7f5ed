"""sr3fast::reverse_step (csrc/reverse_step/): fake kernel and the backend function."""
from __future__ import annotations

import torch

import sr3fast._C  # noqa: F401  (registers torch.ops.sr3fast.*)

from ._layout import kernel_layout


@torch.library.register_fake("sr3fast::reverse_step")
def _reverse_step_fake(y_t, eps, coefs, noise=None, clip=None, generator=None):
    return torch.empty_like(kernel_layout(y_t))


def reverse_step(y_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                 noise: torch.Tensor | None = None, clip: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One fused reverse-diffusion update; see sr3fast.reference.reverse_step.

    Without `noise`, z is drawn inside the op: on CPU exactly as the reference draws it (same
    generator, same values); on CUDA in-kernel with Philox from the generator's CUDA-graph-safe
    state, so a captured sampling loop replays with fresh noise.
    """
    return torch.ops.sr3fast.reverse_step(y_t, eps, coefs, noise, clip, generator)
