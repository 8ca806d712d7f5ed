"""The fused reverse-diffusion update, one pass over memory.

Per element of sample b, with (a, b', m0, m1, sigma) = coefs[b]:

    x0     = a·y_t − b'·eps
    x0     = clamp(x0, −clip, clip)            (HAS_CLIP)
    y_prev = m0·x0 + m1·y_t + sigma·z

Maths in fp32 whatever the storage dtype (fp32 / fp16 / bf16; y_t, eps and noise may differ).

Memory traffic: one read of y_t and eps, one read of z when it is given, one write of y_prev,
plus 20 bytes of coefficients (and 8 of seed) per program, cached. With in-kernel noise that is
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
device memory (drawn per call with torch's generator; see sr3fast.ops.triton.reverse_step).
One Philox evaluation yields four 32-bit words, turned into four N(0, 1) values by two
Box–Muller transforms: element k of sample b takes word k % 4 of the evaluation at counter
(c0, c1) = (k // 4, b). Counters are distinct for every group of four elements within a call,
so every element has its own stream position, and z depends only on (seed, b, k): not on BLOCK,
num_warps or the device (the CPU interpreter draws the same stream, up to the rounding of
log and sqrt).

Instruction budget, which decides whether this stays memory-bound on an H100: bf16 with
in-kernel noise moves 6 B per element, so 85-100% of 3.35 TB/s is 475-560 G elements/s, against
~30 T thread-instructions/s of issue (4 SMSPs x 32 lanes x 132 SMs x ~1.75 GHz): 55-60
instructions per element in all. Hence:
  - a Philox evaluation is ~60 instructions by itself, so all four of its words are used;
  - libdevice's sinf and cosf reduce their argument separately and keep a Payne–Hanek path,
    so _sincos_2pi shares one exact reduction in turns (half the instructions);
  - the four normals are interleaved with join + reshape (order-preserving), which keeps z in
    the loads' layout: each thread draws the noise of exactly the elements it loads
    (quarter-tiles instead made Triton move z through shared memory).
Compiled for sm_90 (Triton 3.8, this file's BLOCK and NUM_WARPS; static SASS, branch-free):
~57 instructions per element with in-kernel noise, ~16 with given noise; 16-byte loads and
stores; no shared or local memory; 63 registers in bf16, 143 in fp32. Measure before trusting.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compat import wrap_triton

# Elements per program. With 4 warps each thread owns 32 consecutive elements: four 16-byte
# accesses per tensor in bf16, eight in fp32, and 8 Philox evaluations; enough bytes in flight
# per thread. To be confirmed on the H100 (bench: sweep BLOCK and NUM_WARPS).
BLOCK = 4096
NUM_WARPS = 4


@triton.jit
def _sincos_2pi(u):
    """(sin 2πu, cos 2πu) for fp32 u in [0, 1), absolute error about 1e-7.

    The angle is reduced exactly in turns (4u − round(4u) is exact in fp32) to p in [−π/4, π/4],
    where Taylor polynomials to p⁹ and p⁸ are accurate to 3e-8; the quadrant then swaps and
    negates. Sine and cosine share the reduction: about half the instructions of libdevice's
    sinf + cosf, which reduce separately and carry a Payne–Hanek path for huge arguments.
    """
    t = 4.0 * u
    quadrant = tl.floor(t + 0.5)
    p = (t - quadrant) * 1.5707963267948966
    p2 = p * p
    s = p * (1.0 + p2 * (-1.0 / 6 + p2 * (1.0 / 120 + p2 * (-1.0 / 5040 + p2 * (1.0 / 362880)))))
    c = 1.0 + p2 * (-0.5 + p2 * (1.0 / 24 + p2 * (-1.0 / 720 + p2 * (1.0 / 40320))))
    q = quadrant.to(tl.int32)
    # (sin, cos)(qπ/2 + p) for q mod 4 = 0, 1, 2, 3: (s, c), (c, −s), (−s, −c), (−c, s)
    odd = (q & 1) != 0
    sin = tl.where(odd, c, s)
    cos = tl.where(odd, s, c)
    sin = tl.where((q & 2) != 0, -sin, sin)
    cos = tl.where(((q + 1) & 2) != 0, -cos, cos)
    return sin, cos


@triton.jit
def _normal_pair(bits_r, bits_theta):
    """Two independent N(0, 1) values from two uniform 32-bit words (Box–Muller).

    The radius clamps u >= 1e-7 against log(0), as tl.randn does: |z| <= 5.68, a tail of
    probability 1.3e-8 that the 24-bit uniforms could barely resolve anyway.
    """
    u = tl.maximum(tl.uint_to_uniform_float(bits_r), 1.0e-7)
    radius = tl.sqrt(-2.0 * tl.log(u))
    sin, cos = _sincos_2pi(tl.uint_to_uniform_float(bits_theta))
    return radius * cos, radius * sin


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
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < N

    if GENERATE_NOISE:
        QUADS: tl.constexpr = BLOCK // 4
        quad = block * QUADS + tl.arange(0, QUADS)   # Philox counter c0 = k // 4
        zero = quad * 0
        r0, r1, r2, r3 = tl.philox(tl.load(seed_ptr), quad, zero + sample, zero, zero)
        z0, z1 = _normal_pair(r0, r1)
        z2, z3 = _normal_pair(r2, r3)
        # (QUADS, 2, 2) -> (BLOCK,), row-major: element 4q + i takes z_i[q]
        z = tl.reshape(tl.join(tl.join(z0, z1), tl.join(z2, z3)), (BLOCK,))
    else:
        z = tl.load(noise_ptr + base + offsets, mask=mask).to(tl.float32)

    y = tl.load(y_ptr + base + offsets, mask=mask).to(tl.float32)
    e = tl.load(eps_ptr + base + offsets, mask=mask).to(tl.float32)
    x0 = a * y - b * e
    if HAS_CLIP:
        # NaN in, NaN out, as torch.clamp: a diverging sampler must not be hidden by the clip.
        x0 = tl.minimum(tl.maximum(x0, -clip, propagate_nan=tl.PropagateNan.ALL), clip,
                        propagate_nan=tl.PropagateNan.ALL)
    y_prev = m0 * x0 + m1 * y + sigma * z
    tl.store(out_ptr + base + offsets, y_prev.to(out_ptr.dtype.element_ty), mask=mask)


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
