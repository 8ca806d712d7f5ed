"""attention on the CPU backend: torch's fused CPU attention (the flash-attention algorithm:
blocks of queries against blocks of keys with an online softmax), so the L×L score matrix is
never stored. Memory is O(L·d) where the reference needs 2·L² fp32 values: at a 128×128
feature map (L = 16384) that is 18 MiB against 2 GiB, measured in tests/test_attention.py.

    out = softmax(q kᵀ · scale) v,   q: (B, heads, Lq, d), k, v: (B, heads, Lk, d)

torch.nn.functional.scaled_dot_product_attention picks its fused CPU kernel only for inputs
whose last dimension has stride 1; any other strides (the U-Net passes q, k, v as views of one
(B, 3C, L) tensor, L-fastest) send it to its plain "math" path, which builds the L×L scores.
So inputs with another stride are copied to (L, d)-contiguous first: O(L·d), the size of the
inputs. The fused kernel keeps its softmax statistics in float32 for every input dtype
(DESIGN.md convention 4) and has a backward that recomputes the scores block by block.

The extension has no C++ attention of its own: torch's kernel is the memory-efficient CPU
implementation this backend needs, and the reference (sr3fast.reference.attention) stays the
readable oracle it is tested against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v; see sr3fast.reference.attention. q: (B, heads, Lq, d);
    k, v: (B, heads, Lk, d), any strides (shapes are checked by sr3fast.ops.attention). Returns
    (B, heads, Lq, d) in q's dtype, contiguous. scale defaults to 1/sqrt(d)."""
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("the cpu attention backend needs q, k, v of one floating dtype among float32, "
                        f"float64, bfloat16, float16; got {q.dtype}, {k.dtype}, {v.dtype}. Cast them, "
                        "or use sr3fast.set_backend('reference') for other dtypes")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=float(scale))


attention.backends = ("cpu",)  # the cuda backend shares this package; on CUDA Triton runs attention
