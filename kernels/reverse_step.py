"""The fused reverse-diffusion update, one pass over memory.

Per element of sample b, with (a, b', m0, m1, sigma[, m2[, m3]]) = coefs[b]:

    x0     = a·y_t − b'·eps
    x0     = clamp(x0, −clip, clip)                          (HAS_CLIP)
    y_prev = (m0·x0 + m1·y_t) + sigma·z                      (single-step samplers)
    y_prev = ((m0·x0 + m1·y_t) + m2·x0_prev) + sigma·z       (HAS_HISTORY: multistep samplers)
    y_prev = (((m0·x0 + m1·y_t) + m2·x0_prev) + m3·x0_prev2) + sigma·z
                                                             (and HAS_HISTORY2: 3M solvers)

and with HAS_HISTORY the clamped x0 is written out as well, in y_t's dtype: the next step's
x0_prev (the loop passes its x0_prev on as the next x0_prev2: no copy). One kernel serves both (HAS_HISTORY is a constexpr: on sm_90 the single-step variant's
SASS is instruction for instruction what it was before the flag existed, but for the parameter
offsets of the two added pointers). Maths in fp32 whatever the storage dtype (fp32 / fp16 /
bf16; y_t, eps, noise and x0_prev may differ).

Memory traffic: one read of y_t and eps, one read of z when it is given, one write of y_prev,
plus 20 bytes of coefficients (and 8 of seed) per program, cached. With in-kernel noise that is
3 elements of traffic per element (6 B in bf16, 12 B in fp32); with given noise, 4. HAS_HISTORY
adds a read of x0_prev, a write of x0 and 4 bytes of coefficient (m2): 5 elements of traffic per
element with in-kernel noise (10 B in bf16, 20 B in fp32), 6 with given noise.

Layout: the kernel sees every tensor as a flat (B, N) array in memory order, N = numel / B,
sample b at [b·N, (b+1)·N). That holds for any dense layout in which the batch dimension is
outermost in memory (contiguous, channels-last, ...), provided y_t, eps, noise, x0_prev, y_prev
and x0 share it; `launch_reverse_step` makes sure they do, copying only when they do not.

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
With HAS_HISTORY the same arithmetic gives a larger budget, because more bytes move per element:
10 B in bf16 is 285-335 G elements/s, 90-105 instructions per element, against the few the
history adds (a load and conversion of x0_prev, a multiply-add, a conversion and store of x0).
Compiled for sm_90 (Triton 3.8, this file's BLOCK and NUM_WARPS; static SASS counted with
cuobjdump, branch-free; 16-byte loads and stores; no shared or local memory):
  single-step   ~54-57 instructions per element with in-kernel noise, ~10-16 with given noise;
                61-62 registers in bf16, 142 in fp32 (in-kernel noise);
  HAS_HISTORY   ~56-61 with in-kernel noise, ~13-20 with given noise; 102-103 registers in
                bf16, 134 in fp32 (in-kernel noise).
In the history variant ptxas issues a thread's twelve 16-byte loads (bf16: y_t, eps, x0_prev)
together, two thirds into the noise computation, and holds them across the rest of it: hence
102-103 registers in bf16, 4 resident programs (16 warps) per SM instead of 8. That still puts
up to ~100 KB of loads in flight per SM, against the ~20 KB per SM that Little's law asks of
3.35 TB/s at ~0.8 µs of latency, so it should stay memory-bound; this is an estimate from the
static code, not a measurement (the history variant's throughput has not been measured).
Measure before trusting. HAS_HISTORY2 adds one more read (x0_prev2) and a multiply-add: 6
elements of traffic per element with in-kernel noise, against the same few instructions.
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
    x0_prev_ptr,    # previous x0: (B, N), same layout as y_t, any float dtype; HAS_HISTORY only
    x0_prev2_ptr,   # x0 of two steps back: (B, N), like x0_prev; HAS_HISTORY2 only
    noise_ptr,      # z: (B, N), same layout as y_t; never read when GENERATE_NOISE
    seed_ptr,       # (1,) int64 Philox key on the device; read only when GENERATE_NOISE
    coefs_ptr,      # (B, 5, 6 or 7) float32 (a, b, m0, m1, sigma[, m2[, m3]]); strides
                    # (coef_stride_b, coef_stride_k); column 5 (m2) is read only when
                    # HAS_HISTORY, column 6 (m3) only when HAS_HISTORY2
    out_ptr,        # y_prev: (B, N), same layout as y_t, y_t's dtype
    x0_ptr,         # x0 (clamped) out: (B, N), same layout as y_t, y_t's dtype; HAS_HISTORY only
    N,              # elements per sample
    blocks_per_sample,  # ceil(N / BLOCK)
    coef_stride_b,  # coefs.stride(0), may be 0 (one row broadcast over the batch)
    coef_stride_k,  # coefs.stride(1)
    clip,           # fp32 clamp bound, read only when HAS_CLIP
    HAS_CLIP: tl.constexpr,
    GENERATE_NOISE: tl.constexpr,
    HAS_HISTORY: tl.constexpr,  # the multistep update: + m2·x0_prev, and x0 written out
    HAS_HISTORY2: tl.constexpr,  # with HAS_HISTORY: + m3·x0_prev2 as well
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
    y_prev = m0 * x0 + m1 * y
    if HAS_HISTORY:
        m2 = tl.load(row + 5 * coef_stride_k)
        x0_prev = tl.load(x0_prev_ptr + base + offsets, mask=mask).to(tl.float32)
        y_prev = y_prev + m2 * x0_prev
        if HAS_HISTORY2:
            m3 = tl.load(row + 6 * coef_stride_k)
            x0_prev2 = tl.load(x0_prev2_ptr + base + offsets, mask=mask).to(tl.float32)
            y_prev = y_prev + m3 * x0_prev2
        tl.store(x0_ptr + base + offsets, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    # (((m0·x0 + m1·y) [+ m2·x0_prev]) [+ m3·x0_prev2]) + sigma·z, in the contract's order (the compiler may fuse
    # a multiply into the add that follows it; the tests' tolerances allow either).
    y_prev = y_prev + sigma * z
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
                        clip: float | None, x0_prev: torch.Tensor | None = None,
                        x0_prev2: torch.Tensor | None = None
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One launch of the update for y_t, eps, noise (and x0_prev, x0_prev2) of one shape
    (B, ...) and coefs (B, 5), (B, 6) or (B, 7) float32, all on one device.

    Without x0_prev: returns y_prev; coefs columns 0..4 are read, m2 and m3 are ignored.
    With x0_prev (the previous step's clamped x0, any float dtype; coefs (B, 6) or (B, 7)):
    returns (y_prev, x0), y_prev = ((m0·x0 + m1·y_t) + m2·x0_prev) + sigma·z and x0 this step's
    clamped estimate, in y_t's dtype and in y_prev's layout (the next step's x0_prev). With
    x0_prev2 as well (the x0 of two steps back; coefs (B, 7)) y_prev gains + m3·x0_prev2 before
    the noise term.

    Exactly one of noise (z) and seed ((1,) int64 on the device: Philox key for in-kernel z) is
    given; the same seed draws the same z with and without x0_prev. Fast path: y_t dense with the
    batch outermost (contiguous or channels-last) and eps / noise / x0_prev in the same layout —
    no copies, and y_prev (and x0) get y_t's strides. Otherwise y_t is first copied to contiguous
    (channels-last when its channels are innermost) and eps / noise / x0_prev to y_t's layout;
    those copies cost a read and a write each.

    The launch goes through torch.library.wrap_triton so that, called from a triton_op,
    torch.compile and torch.export trace the kernel itself; outside tracing it is a plain launch.
    """
    if (noise is None) == (seed is None):
        raise ValueError("launch_reverse_step: pass exactly one of noise and seed")
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError(f"launch_reverse_step: seed must be one int64 element, got {seed.dtype} "
                         f"{tuple(seed.shape)}")
    history = x0_prev is not None
    history2 = x0_prev2 is not None
    if history2 and not history:
        raise ValueError("launch_reverse_step: x0_prev2 needs x0_prev")
    widths = (7,) if history2 else (6, 7) if history else (5, 6, 7)
    if coefs.dim() != 2 or coefs.shape[1] not in widths:
        wanted = ("(B, 7) float32 (a, b, m0, m1, sigma, m2, m3) when x0_prev2 is given" if history2
                  else "(B, 6) or (B, 7) float32 (a, b, m0, m1, sigma, m2[, m3]) when x0_prev is given"
                  if history else "(B, 5), (B, 6) or (B, 7) float32 (a, b, m0, m1, sigma[, m2[, m3]])")
        raise ValueError(f"launch_reverse_step: coefs must be {wanted}; got {tuple(coefs.shape)}")
    for name, past in (("x0_prev", x0_prev), ("x0_prev2", x0_prev2)):
        if past is not None and past.shape != y_t.shape:
            raise ValueError(f"launch_reverse_step: {name} {tuple(past.shape)} must match y_t "
                             f"{tuple(y_t.shape)}")
    out_dtype = y_t.dtype
    if not _is_dense_batch_major(y_t):
        channels_last = y_t.dim() == 4 and y_t.stride(1) == 1 and y_t.shape[1] > 1
        y_t = y_t.contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
    eps = _in_layout_of(eps, y_t)
    if noise is not None:
        noise = _in_layout_of(noise, y_t)
    if history:
        x0_prev = _in_layout_of(x0_prev, y_t)
    if history2:
        x0_prev2 = _in_layout_of(x0_prev2, y_t)
    out = torch.empty_like(y_t, dtype=out_dtype)
    x0 = torch.empty_like(y_t, dtype=out_dtype) if history else None
    if y_t.numel() == 0:
        return (out, x0) if history else out

    batch = y_t.shape[0]
    per_sample = y_t.numel() // batch
    blocks_per_sample = triton.cdiv(per_sample, BLOCK)
    wrap_triton(reverse_step_kernel)[(batch * blocks_per_sample,)](
        y_t, eps,
        x0_prev if history else y_t,          # placeholder pointer, never read
        x0_prev2 if history2 else y_t,        # placeholder pointer, never read
        y_t if noise is None else noise,      # placeholder pointer, never read
        coefs if seed is None else seed,      # placeholder pointer, never read
        coefs, out,
        x0 if history else out,               # placeholder pointer, never written
        per_sample, blocks_per_sample, coefs.stride(0), coefs.stride(1),
        0.0 if clip is None else float(clip),
        HAS_CLIP=clip is not None, GENERATE_NOISE=noise is None, HAS_HISTORY=history,
        HAS_HISTORY2=history2,
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return (out, x0) if history else out
