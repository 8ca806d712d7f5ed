"""The Triton backend of `attention`: custom ops over kernels/attention.py, with autograd.

    sr3fast::attention_triton(q, k, v, scale) -> (out, lse)
    sr3fast::attention_backward_triton(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)

Both are `torch.library.triton_op`s whose kernels are launched through `wrap_triton`, so
torch.compile, torch.export and CUDA graphs trace through to the kernels; the same Python body
serves as the fake (meta) implementation. `lse` is the fp32 logsumexp of each row of the scaled
scores, saved for the backward, which recomputes the softmax from it instead of storing it.
"""
from __future__ import annotations

import math

import torch
from torch.library import register_autograd, triton_op

from sr3fast.kernels.attention import attention_backward, attention_forward

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton_op("sr3fast::attention_triton", mutates_args=())
def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q kᵀ · scale) v, per-row logsumexp (B, heads, Lq) fp32); any strides."""
    return attention_forward(q, k, v, scale)


@triton_op("sr3fast::attention_backward_triton", mutates_args=())
def attention_grad(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) given the forward's output and logsumexp."""
    return attention_backward(grad_out, q, k, v, out, lse, scale)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_grad(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


register_autograd("sr3fast::attention_triton", _backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v; see sr3fast.reference.attention. Shapes are checked by the
    dispatcher (sr3fast.ops.attention); here, what the kernels need of dtypes and devices.

    The result has q's dtype and q's memory order over (L, d) (L-fastest for views of a
    (B, 3C, H, W) qkv tensor), so reshaping it back to an image is a view.
    """
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("the triton attention backend needs q, k, v of one dtype among float32, "
                        f"float16, bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}. Cast them, or "
                        "use sr3fast.set_backend('reference') for other dtypes")
    if not q.device == k.device == v.device:
        raise ValueError(f"attention: q, k, v must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return attention_with_lse(q, k, v, float(scale))[0]
