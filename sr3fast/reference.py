"""The pure-PyTorch oracle of every fused op: written for clarity, with fp32 maths.

Every fast backend is tested against these functions. Each takes and returns tensors in the
caller's dtype but computes in float32, so a bf16 input is compared against fp32 maths.
They are differentiable through ordinary autograd.
"""
from __future__ import annotations

import math

import torch


def groupnorm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   shift: torch.Tensor | None = None, act: bool = True) -> torch.Tensor:
    """y = SiLU(GroupNorm(x + shift)), or GroupNorm(x + shift) when act=False.

    x: (B, C, *spatial); shift: (B, C), broadcast over the spatial dims (the per-sample
    noise-level bias SR3 adds inside every residual block); weight, bias: (C,).
    Statistics per (sample, group) over C/num_groups channels and all spatial positions,
    biased variance, as torch.nn.GroupNorm.
    """
    batch, channels = x.shape[:2]
    h = x.float()
    if shift is not None:
        h = h + shift.float().reshape(batch, channels, *([1] * (x.dim() - 2)))
    grouped = h.reshape(batch, num_groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = grouped.var(dim=-1, unbiased=False, keepdim=True)
    y = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(h.shape)
    affine_shape = (1, channels, *([1] * (x.dim() - 2)))
    if weight is not None:
        y = y * weight.float().reshape(affine_shape)
    if bias is not None:
        y = y + bias.float().reshape(affine_shape)
    if act:
        y = y * torch.sigmoid(y)
    return y.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v.

    q: (B, heads, Lq, d); k, v: (B, heads, Lk, d); scale defaults to 1/sqrt(d).
    Returns (B, heads, Lq, d).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, v.float()).to(q.dtype)


def reverse_step(y_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                 noise: torch.Tensor | None = None, clip: float | None = None,
                 generator: torch.Generator | None = None, x0_prev: torch.Tensor | None = None,
                 x0_prev2: torch.Tensor | None = None):
    """One reverse-diffusion update in the general form every SR3 sampler reduces to:

        x0     = a·y_t − b·eps                          (the clean image implied by eps)
        x0     = clamp(x0, −clip, clip)                 (only when clip is given)
        y_prev = m0·x0 + m1·y_t + m2·x0_prev + m3·x0_prev2 + sigma·z
                                                        (m2·x0_prev, m3·x0_prev2: multistep only)

    y_t, eps: (B, *); coefs: (B, 5) float32 holding (a, b, m0, m1, sigma) per sample, or (B, 6)
    with m2 next, or (B, 7) with m2, m3. z is `noise` when given (same shape as y_t), else drawn
    from N(0, I) with `generator`.

    Without x0_prev (single-step samplers; no history is a zero history): returns y_prev.
    With x0_prev, the previous step's x0 shaped like y_t (multistep samplers; coefs (B, 6) or
    (B, 7)), and x0_prev2, the x0 of the step before that (three-step solvers; coefs (B, 7)):
    returns (y_prev, x0), x0 being this step's clamped estimate, the next step's x0_prev.
    Both in y_t's dtype. Operations run in float32 in the order written, left to right.
    """
    batch = y_t.shape[0]
    width = coefs.shape[-1]
    per_sample = coefs.float().reshape(batch, width, *([1] * (y_t.dim() - 1)))
    a, b, m0, m1, sigma = per_sample.unbind(dim=1)[:5]
    y = y_t.float()
    x0 = a * y - b * eps.float()
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    if noise is None:
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=torch.float32)
    if x0_prev is None:
        y_prev = m0 * x0 + m1 * y + sigma * noise.float()
        return y_prev.to(y_t.dtype)
    m2 = per_sample[:, 5]
    y_prev = m0 * x0 + m1 * y + m2 * x0_prev.float()
    if x0_prev2 is not None:
        y_prev = y_prev + per_sample[:, 6] * x0_prev2.float()
    y_prev = y_prev + sigma * noise.float()
    return y_prev.to(y_t.dtype), x0.to(y_t.dtype)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The U-Net's convolutions (3x3 and 1x1, zero padding, no dilation or groups), exactly as
    torch.nn.functional.conv2d computes them. x: (B, C, H, W); weight: (O, C, kh, kw); bias (O,)."""
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding)
