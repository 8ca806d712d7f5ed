"""groupnorm_silu: y = SiLU(GroupNorm(x + shift)) — every norm→activation pair of the SR3 U-Net."""
from __future__ import annotations

import torch

from ._dispatch import implementation


def groupnorm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   shift: torch.Tensor | None = None, act: bool = True) -> torch.Tensor:
    """SiLU(GroupNorm(x + shift)) with shift (B, C) broadcast over space; act=False drops the SiLU.

    x: (B, C, *spatial), any memory format; weight, bias: (C,); statistics in float32.
    """
    if x.dim() < 2:
        raise ValueError(f"groupnorm_silu expects x of shape (B, C, ...), got {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"groupnorm_silu: num_groups={num_groups} must divide the {channels} "
                         f"channels of x")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tuple(tensor.shape) != (channels,):
            raise ValueError(f"groupnorm_silu: {name} must have shape ({channels},), "
                             f"got {tuple(tensor.shape)}")
    if shift is not None and tuple(shift.shape) != (batch, channels):
        raise ValueError(f"groupnorm_silu: shift must have shape ({batch}, {channels}) "
                         f"(one bias per sample and channel), got {tuple(shift.shape)}")
    return implementation("groupnorm_silu", x.device)(x, num_groups, weight, bias, eps, shift, act)
