"""The fused reverse-diffusion update, one pass over memory.

Per element of sample b, with (a, b', m0, m1, sigma) = coefs[b]:

    x0     = a·y_t − b'·eps
    x0     = clamp(x0, −clip, clip)            (HAS_CLIP)
    y_prev = m0·x0 + m1·y_t + sigma·z

Maths in fp32 whatever the storage dtype (fp32 / fp16 / bf16; y_t, eps and noise may differ).

Memory traffic: one read of y_t and eps, one read of z when it is given, one write of y_prev,
plus 20 bytes of coefficients (and 8 bytes of seed) per program. With in-kernel noise that is
3 elements of traffic per element (6 B in bf16, 12 B in fp32); with given noise, 4.

Layout: the kernel sees every tensor as a flat (B, N) array in memory order, N = numel / B,
sample b at [b·N, (b+1)·N). That holds for any dense layout in which the batch dimension is
outermost in memory (contiguous, channels-last, ...), provided y_t, eps, noise and y_prev share
it; `launch_reverse_step` makes sure they do, copying only when they do not.

Grid: 1-D, B · ceil(N / BLOCK) programs; program p handles elements
[j·BLOCK, (j+1)·BLOCK) of sample b = p // ceil(N / BLOCK), j = p % ceil(N / BLOCK). One integer
division per program (not per element) buys scalar coefficient loads and no grid-dimension limit
on B. Only the last block of each sample is partly masked.

In-kernel noise (GENERATE_NOISE): counter-based Philox4x32-10 keyed by a 64-bit seed read from
device memory (drawn per call by the caller with torch's generator; see sr3fast.ops.triton).
One Philox evaluation yields four 32-bit words, turned into four N(0, 1) values by two
Box–Muller transforms, so a program splits its block into four contiguous quarters of
BLOCK / 4 elements and element (b, j·BLOCK + q·BLOCK/4 + i) takes output q of the evaluation at
counter (c0, c1) = (j·BLOCK/4 + i, b). Counters are distinct for every group of four elements
within a call, so every element gets its own stream position. Using all four words matters on
an H100: ten Philox rounds cost about a hundred integer instructions, which per element would
make the kernel compute-bound at bf16's 6 bytes per element; per four elements they fit under
the memory time. The quarters keep every load and store contiguous and coalesced.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Elements per program: four quarters of 1024, i.e. 8 elements per thread per quarter with
# 4 warps: one 16-byte access per thread per quarter in bf16, two in fp32. To be confirmed by the
# benchmark on the H100 (sweep BLOCK and NUM_WARPS there).
BLOCK = 4096
NUM_WARPS = 4


@triton.jit
def _update_tile(y_ptr, eps_ptr, out_ptr, offsets, mask, z,
                 a, b, m0, m1, sigma, clip, HAS_CLIP: tl.constexpr):
    """y_prev for one contiguous tile. offsets, mask, z: (TILE,) ; the rest are fp32 scalars."""
    y = tl.load(y_ptr + offsets, mask=mask).to(tl.float32)
    e = tl.load(eps_ptr + offsets, mask=mask).to(tl.float32)
    x0 = a * y - b * e
    if HAS_CLIP:
        # NaN in, NaN out, as torch.clamp: a diverging sampler must not be hidden by the clip.
        x0 = tl.minimum(tl.maximum(x0, -clip, propagate_nan=tl.PropagateNan.ALL), clip,
                        propagate_nan=tl.PropagateNan.ALL)
    y_prev = m0 * x0 + m1 * y + sigma * z
    tl.store(out_ptr + offsets, y_prev.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def reverse_step_kernel(
    y_ptr,          # y_t: (B, N) flat in memory order, fp32/fp16/bf16
    eps_ptr,        # eps: (B, N), same layout as y_t, any float dtype
    noise_ptr,      # z: (B, N), same layout as y_t; never read when GENERATE_NOISE
    seed_ptr,       # (1,) int64 Philox key on the device; read only when GENERATE_NOISE
    coefs_ptr,      # (B, 5) float32 (a, b, m0, m1, sigma); strides (coef_stride_b, coef_stride_k)
    out_ptr,        # y_prev: (B, N), same layout as y_t, y_t's dtype
    N,              # elements per sample
    blocks_per_sample,  # ceil(N / BLOCK)
    coef_stride_b,  # coefs.stride(0), may be 0 (one row broadcast over the batch)
    coef_stride_k,  # coefs.stride(1)
    clip,           # fp32 clamp bound, read only when HAS_CLIP
    HAS_CLIP: tl.constexpr,
    GENERATE_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4 · 32 · num_warps
):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    block = pid % blocks_per_sample

    row = coefs_ptr + sample * coef_stride_b
    a = tl.load(row)
    b = tl.load(row + coef_stride_k)
    m0 = tl.load(row + 2 * coef_stride_k)
    m1 = tl.load(row + 3 * coef_stride_k)
    sigma = tl.load(row + 4 * coef_stride_k)

    # int64: B·N can pass 2**31 at 1024² and batch 1000; in-sample offsets stay int32.
    base = sample.to(tl.int64) * N
    y_ptr += base
    eps_ptr += base
    noise_ptr += base
    out_ptr += base
    start = block * BLOCK

    if GENERATE_NOISE:
        QUARTER: tl.constexpr = BLOCK // 4
        lane = tl.arange(0, QUARTER)
        seed = tl.load(seed_ptr)
        counter = block * QUARTER + lane           # unique per group of four within the sample
        zero = counter * 0
        r0, r1, r2, r3 = tl.philox(seed, counter, zero + sample, zero, zero)
        z0, z1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
        z2, z3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
        offsets = start + lane
        _update_tile(y_ptr, eps_ptr, out_ptr, offsets, offsets < N, z0,
                     a, b, m0, m1, sigma, clip, HAS_CLIP)
        offsets += QUARTER
        _update_tile(y_ptr, eps_ptr, out_ptr, offsets, offsets < N, z1,
                     a, b, m0, m1, sigma, clip, HAS_CLIP)
        offsets += QUARTER
        _update_tile(y_ptr, eps_ptr, out_ptr, offsets, offsets < N, z2,
                     a, b, m0, m1, sigma, clip, HAS_CLIP)
        offsets += QUARTER
        _update_tile(y_ptr, eps_ptr, out_ptr, offsets, offsets < N, z3,
                     a, b, m0, m1, sigma, clip, HAS_CLIP)
    else:
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < N
        z = tl.load(noise_ptr + offsets, mask=mask).to(tl.float32)
        _update_tile(y_ptr, eps_ptr, out_ptr, offsets, mask, z,
                     a, b, m0, m1, sigma, clip, HAS_CLIP)


def _is_dense_batch_major(t: torch.Tensor) -> bool:
    """Whether t's elements fill a contiguous span (no gaps, no overlap) with the batch dimension
    outermost, so that sample b is the span [b·N, (b+1)·N). Size-1 dimensions do not matter."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return t.shape[0] == 1 or t.stride(0) * t.shape[0] == expected


def _same_layout(t: torch.Tensor, like: torch.Tensor) -> bool:
    return all(a == b for a, b, size in zip(t.stride(), like.stride(), like.shape) if size > 1)


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t itself when it already has like's layout, else a copy of t with like's strides."""
    if _same_layout(t, like):
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def launch_reverse_step(y_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                        noise: torch.Tensor | None, seed: torch.Tensor | None,
                        clip: float | None) -> torch.Tensor:
    """y_prev for y_t, eps, noise of one shape (B, ...) and coefs (B, 5) float32, all on one device.

    Exactly one of noise (z) and seed ((1,) int64 on the device: Philox key for in-kernel z) is
    given. Fast path: y_t dense with the batch outermost (contiguous or channels-last) and eps /
    noise in the same layout — no copies, and y_prev gets y_t's strides. Otherwise y_t is first
    copied to contiguous (channels-last when its channels are innermost) and eps / noise to
    y_t's layout; those copies cost a read and a write each.

    The launch goes through torch.library.wrap_triton so that, called from a triton_op,
    torch.compile and torch.export trace the kernel itself; outside tracing it is a plain launch.
    """
    if (noise is None) == (seed is None):
        raise ValueError("launch_reverse_step: pass exactly one of noise and seed")
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError(f"launch_reverse_step: seed must be one int64 element, got {seed.dtype} "
                         f"{tuple(seed.shape)}")
    out_dtype = y_t.dtype
    if not _is_dense_batch_major(y_t):
        channels_last = y_t.dim() == 4 and y_t.stride(1) == 1 and y_t.shape[1] > 1
        y_t = y_t.contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
    eps = _in_layout_of(eps, y_t)
    if noise is not None:
        noise = _in_layout_of(noise, y_t)
    out = torch.empty_like(y_t, dtype=out_dtype)
    if y_t.numel() == 0:
        return out

    batch = y_t.shape[0]
    per_sample = y_t.numel() // batch
    blocks_per_sample = triton.cdiv(per_sample, BLOCK)
    wrap_triton(reverse_step_kernel)[(batch * blocks_per_sample,)](
        y_t, eps,
        y_t if noise is None else noise,      # placeholder pointer, never read
        coefs if seed is None else seed,      # placeholder pointer, never read
        coefs, out,
        per_sample, blocks_per_sample, coefs.stride(0), coefs.stride(1),
        0.0 if clip is None else float(clip),
        HAS_CLIP=clip is not None, GENERATE_NOISE=noise is None,
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return out
