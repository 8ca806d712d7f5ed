"""attention: softmax(q kᵀ · scale) v with SR3's one wide head (d = channels, up to 1024)."""
from __future__ import annotations

import torch

from ._dispatch import implementation


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """q: (B, heads, Lq, d); k, v: (B, heads, Lk, d), any strides; returns (B, heads, Lq, d).

    scale defaults to 1/sqrt(d); softmax statistics in float32.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects q, k, v of shape (B, heads, L, d); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError("attention: q (B, heads, Lq, d) and k, v (B, heads, Lk, d) must agree "
                         f"in B, heads and d; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return implementation("attention", q.device)(q, k, v, scale)
