"""Fused y = SiLU(GroupNorm(x + shift)) (or plain GroupNorm with act=False), forward and backward.

x is seen as (B, C, S): S is the product of the spatial dims. Two memory orders are read natively
and the output keeps the input's order:
  NCHW  (contiguous)     element (b, c, s) at b·C·S + c·S + s
  NHWC  (channels-last)  element (b, c, s) at b·C·S + s·C + c
shift (B, C) is SR3's per-sample noise-level bias; weight and bias (C,) are the affine terms.
All arithmetic is fp32; mean and rstd are stored as fp32 (B, G).

Work unit. A program owns a *group block*: GPP whole groups of one sample (GPP·C/G channels),
held as a [BLOCK_C, BLOCK_S] tile of channels × spatial positions; `member` [BLOCK_C, BLOCK_G]
maps channels to groups so group sums are two small reductions. One group per block is the rule
for NCHW, where a group is one contiguous run. NHWC packs groups until a tile row spans ~64
channels (128 B in bf16), a multiple of 16 channels where possible: a row of a single 2-channel
group would use 4 bytes of each 32-byte sector. Tiny NCHW groups (1×1, 2×2 spatial) are packed
the same way to give programs real work. Masks are compiled in only where a tile can be ragged
(FULL_C / FULL_S constexprs); SR3's shapes need none.

Three ways to run, chosen by `plan()` from the shape and the GPU's SM count:
  tile   whole group block in registers (≤ 16K fp32, bwd 8K): grid (blocks, B).
         HBM traffic: fwd 1 read + 1 write; bwd reads x, dy once, writes dx.
  loop   one program per group block that loops over S: a Chan-merge pass for the moments, then
         a normalizing pass that re-reads the program's own data, from L2 while the groups of
         the programs in flight fit there. Used when groups are too large for registers but
         there are enough of them to fill the GPU (training batches).
  split  few, large groups (batch-1 inference): each group is cut into spatial splits so the GPU
         is full. fwd: partial moments (grid (splits, blocks, B)) → normalize (grid
         (S/BLOCK_S, blocks, B), run back to front so the tiles the moments pass read last are
         still in L2), each program merging its groups' partials itself when they are few
         (NCHW: 8-16 per group at SR3 sizes), else after one merge kernel (grid B·G/BLOCK_R).
         bwd: partial sums → per-group terms → dx, same shapes. Traffic: x (and dy) are read
         twice; at SR3's batch-1 sizes (≤ 4 MB in bf16) they fit in the 50 MB L2, so the
         second read need not reach HBM.
Statistics are exact merges of per-tile (count, mean, M2) (Chan et al.), never E[x²] − E[x]².

SR3 shapes on an H100 (132 SMs), as planned (tests pin this table; "launches" counts kernels):
  shape, groups         group            NCHW                          NHWC
  1×64×128×128,  G=32   2 ch × 16K       split 8/group: 2 launches     split, GPP=32: 3 launches
  16×512×16×16,  G=32   16 ch × 256      tile: 1 launch, 512 programs  tile, GPP=4: 128 programs
  4×128×64×64,   G=32   4 ch × 4K        tile: 1 launch, 128 programs  split, GPP=16: 3 launches
  1×1024×32×32,  G=16   64 ch × 1K       split 16/group: 2 launches    split 16/group: 2 launches
  (every split above runs 256-512 programs per pass)
Autotuning (num_warps, and the streaming kernels' BLOCK_S) happens on the first call per shape:
run one warm-up step before capturing a CUDA graph. SR3FAST_TRITON_AUTOTUNE=pinned (and the
interpreter) skip the timing and run each kernel's first kept config (kernels/autotuning.py).

Backward, with h = x + shift, x̂ = (h − mean)·rstd, z = w·x̂ + b, y = SiLU(z):
  dz = dy·σ(z)·(1 + z·(1 − σ(z)))                     (dz = dy when act=False)
  dx = rstd·(w·dz − mean_g(w·dz) − x̂·mean_g(w·dz·x̂))   (means over the sample's group)
  dshift[b, c] = Σ_s dx;  dweight[c] = Σ_b,s dz·x̂;  dbias[c] = Σ_b,s dz
Per-(sample, channel) sums Σ dz, Σ dz·x̂, Σ x̂ give every reduction; dweight and dbias are then
summed over the batch by one small deterministic kernel (no atomics).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from . import autotuning
from .compat import wrap_triton


# ---------------------------------------------------------------------------------------------
# Tile helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _group_block(gblk, C, G, CPG, CPB, GPP: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_G: tl.constexpr):
    """Channels c [BLOCK_C] and groups g [BLOCK_G] of group block `gblk`, their masks, and the
    channel→group membership matrix [BLOCK_C, BLOCK_G] (fp32 0/1). CPB = GPP·CPG channels per
    block comes in as an argument so that Triton specializes it when it is a multiple of 16:
    the channel mask then stays uniform over 16 lanes and NHWC accesses stay vectorized."""
    j = tl.arange(0, BLOCK_C)
    c = gblk * CPB + j
    c_mask = (j < CPB) & (c < C)
    k = tl.arange(0, BLOCK_G)
    g = gblk * GPP + k
    g_mask = (k < GPP) & (g < G)
    member = ((j // CPG)[:, None] == k[None, :]) & c_mask[:, None]
    return c, c_mask, g, g_mask, member.to(tl.float32)


@triton.jit
def _offsets(c, s, C, S, CHANNELS_LAST: tl.constexpr):
    """[BLOCK_C, BLOCK_S] element offsets within one sample."""
    if CHANNELS_LAST:
        return s[None, :] * C + c[:, None]
    else:
        return c[:, None] * S + s[None, :]


@triton.jit
def _tile_mask(c_mask, s, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
               FULL_C: tl.constexpr, FULL_S: tl.constexpr):
    """In-bounds mask; a constant-true mask (folded away by the compiler) when the tile is full,
    so loads along the contiguous axis stay vectorized."""
    mask = tl.full([BLOCK_C, BLOCK_S], 1, tl.int1)
    if not FULL_C:
        mask = mask & c_mask[:, None]
    if not FULL_S:
        mask = mask & (s < S)[None, :]
    return mask


@triton.jit
def _channel_vector(ptr, index, mask, PRESENT: tl.constexpr, default: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """A per-channel fp32 vector [BLOCK_C] loaded from ptr[index], or `default` if absent."""
    if PRESENT:
        return tl.load(ptr + index, mask=mask, other=default).to(tl.float32)
    else:
        return tl.full([BLOCK_C], default, tl.float32)


@triton.jit
def _per_channel(member, per_group):
    """Broadcast a [BLOCK_G] group vector to its channels [BLOCK_C]."""
    return tl.sum(member * per_group[None, :], axis=1)


@triton.jit
def _per_group(member, per_channel):
    """Sum a [BLOCK_C] channel vector over each group [BLOCK_G]."""
    return tl.sum(member * per_channel[:, None], axis=0)


@triton.jit
def _moments(h, mask, member, n_s):
    """(count, mean, M2) per group of a tile h [BLOCK_C, BLOCK_S] (fp32, zero outside `mask`);
    n_s is the number of in-bounds spatial positions. Two passes over registers: exact."""
    count = tl.sum(member, axis=0) * n_s
    mean = _per_group(member, tl.sum(h, axis=1)) / tl.maximum(count, 1.0)
    centered = tl.where(mask, h - _per_channel(member, mean)[:, None], 0.0)
    m2 = _per_group(member, tl.sum(centered * centered, axis=1))
    return count, mean, m2


@triton.jit
def _merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s exact merge of two (count, mean, M2) summaries."""
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _silu(z, ACT: tl.constexpr):
    if ACT:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _grad_z(xhat, dy, weight, bias, ACT: tl.constexpr):
    """dL/dz for z = w·x̂ + b and y = SiLU(z): SiLU'(z) = σ(z)·(1 + z·(1 − σ(z)))."""
    if ACT:
        z = xhat * weight[:, None] + bias[:, None]
        sig = tl.sigmoid(z)
        return dy * sig * (1.0 + z * (1.0 - sig))
    else:
        return dy


@triton.jit
def _input_grad_terms(sum_dz, sum_dzx, sum_xhat, member, weight, rstd, rstd_c, CPG, S):
    """From per-channel Σ_s dz, Σ_s dz·x̂, Σ_s x̂ of one sample: the per-channel terms a, q of
    dx = rstd·w·dz − a − q·x̂, with a = rstd·mean_g(w·dz) and q = rstd·mean_g(w·dz·x̂), and
    dshift = Σ_s dx."""
    group_size = CPG * S
    a = _per_channel(member, rstd * _per_group(member, weight * sum_dz) / group_size)
    q = _per_channel(member, rstd * _per_group(member, weight * sum_dzx) / group_size)
    dshift = rstd_c * weight * sum_dz - S * a - q * sum_xhat
    return a, q, dshift


# ---------------------------------------------------------------------------------------------
# Autotuning: configs and pruning
# ---------------------------------------------------------------------------------------------

# Candidates in order of preference: under a pin switch (kernels/autotuning.py) the first one the
# prune rule keeps is the only one that runs, so it must be a good choice on its own.

def _register_tile_configs():
    """Register-tile kernels: only num_warps. 8 warps first, the usual choice for reductions
    (Triton's layer-norm tutorial), kept by the prune rule for tiles of 2K..16K elements (8..64
    per thread): every SR3 loop and split tile and most whole-group tiles. Smaller tiles get 4,
    then 2 warps; tiles over 16K (very wide channel blocks) 16."""
    return [triton.Config({}, num_warps=w) for w in (8, 4, 16, 2)]


def _stream_configs():
    """Elementwise kernels: BLOCK_S ascending, 4 warps first, so the first kept config is the
    smallest tile of ≥ 2K elements at 16 elements per thread: the most programs for the batch-1
    (split) shapes these kernels serve, each with a full 16-byte vector per thread."""
    return [triton.Config({"BLOCK_S": s}, num_warps=w)
            for s in (16, 32, 64, 128, 256, 512, 1024, 2048) for w in (4, 8)]


def _keep_register_tiles(configs, named_args, **kwargs):
    """Warp counts that give each thread 8..64 tile elements: at least one 16-byte vector of
    bf16, and at most what fits in registers (the backward holds several tiles live)."""
    args = {**named_args, **kwargs}
    tile = args["BLOCK_C"] * args["BLOCK_S"]
    kept = [cfg for cfg in configs if 8 <= tile // (32 * cfg.num_warps) <= 64]
    return kept or [min(configs, key=lambda cfg: abs(tile // (32 * cfg.num_warps) - 16))]


def _keep_stream_tiles(configs, named_args, **kwargs):
    """Elementwise passes: tiles of 2K..8K elements, not wider than the spatial extent."""
    args = {**named_args, **kwargs}
    block_c, width = args["BLOCK_C"], triton.next_power_of_2(args["S"])

    def size(cfg):
        return block_c * min(cfg.kwargs["BLOCK_S"], width)
    kept = [cfg for cfg in configs
            if cfg.kwargs["BLOCK_S"] <= max(width, 16) and 2048 <= size(cfg) <= 8192
            and size(cfg) // (32 * cfg.num_warps) >= 8]
    if not kept:  # tiny or very wide-channel blocks: the single best-fitting tile
        best = min(configs, key=lambda cfg: (abs(size(cfg) - 4096), cfg.kwargs["BLOCK_S"]))
        kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_S"] == best.kwargs["BLOCK_S"]]
    return kept


# autotuning.autotune cuts the kept candidates to the first under SR3FAST_TRITON_AUTOTUNE=pinned
# and under the interpreter (which cannot time anything)
_REGISTER_TILE = dict(configs=_register_tile_configs(),
                      key=["BLOCK_C", "BLOCK_S", "ONE_TILE", "CHANNELS_LAST"],
                      prune=_keep_register_tiles)
_STREAM = dict(configs=_stream_configs(), key=["S", "BLOCK_C", "CHANNELS_LAST"],
               prune=_keep_stream_tiles)


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------

@autotuning.autotune(**_REGISTER_TILE)
@triton.jit
def _forward_group_kernel(
    x_ptr,       # (B, C, S) input, NCHW or NHWC order (CHANNELS_LAST); fp32/fp16/bf16
    shift_ptr,   # (B, C) contiguous; read iff HAS_SHIFT
    weight_ptr,  # (C,); read iff HAS_WEIGHT
    bias_ptr,    # (C,); read iff HAS_BIAS
    y_ptr,       # (B, C, S) output, same order and dtype as x
    mean_ptr,    # (B, G) fp32 output
    rstd_ptr,    # (B, G) fp32 output
    C, S, G, CPG, CPB, eps,
    GPP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    ONE_TILE: tl.constexpr, FULL_C: tl.constexpr, FULL_S: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
):
    """Grid (group blocks, B). ONE_TILE: the block lives in registers (BLOCK_S ≥ S); else loop."""
    gblk = tl.program_id(0)
    b = tl.program_id(1)
    sample = b.to(tl.int64) * C * S
    c, c_mask, g, g_mask, member = _group_block(gblk, C, G, CPG, CPB, GPP, BLOCK_C, BLOCK_G)
    shift = _channel_vector(shift_ptr, b * C + c, c_mask, HAS_SHIFT, 0.0, BLOCK_C)
    weight = _channel_vector(weight_ptr, c, c_mask, HAS_WEIGHT, 1.0, BLOCK_C)
    bias = _channel_vector(bias_ptr, c, c_mask, HAS_BIAS, 0.0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)

    if ONE_TILE:
        mask = _tile_mask(c_mask, s, S, BLOCK_C, BLOCK_S, FULL_C, FULL_S)
        offs = sample + _offsets(c, s, C, S, CHANNELS_LAST)
        h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + shift[:, None]
        h = tl.where(mask, h, 0.0)
        count, mean, m2 = _moments(h, mask, member, S)
    else:
        count = tl.zeros([BLOCK_G], tl.float32)
        mean = tl.zeros([BLOCK_G], tl.float32)
        m2 = tl.zeros([BLOCK_G], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            mask = _tile_mask(c_mask, s0 + s, S, BLOCK_C, BLOCK_S, FULL_C, FULL_S)
            offs = sample + _offsets(c, s0 + s, C, S, CHANNELS_LAST)
            t = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + shift[:, None]
            t = tl.where(mask, t, 0.0)
            n_t, mean_t, m2_t = _moments(t, mask, member, tl.minimum(S - s0, BLOCK_S))
            count, mean, m2 = _merge_moments(count, mean, m2, n_t, mean_t, m2_t)

    rstd = tl.rsqrt(m2 / tl.maximum(count, 1.0) + eps)
    tl.store(mean_ptr + b * G + g, mean, mask=g_mask)
    tl.store(rstd_ptr + b * G + g, rstd, mask=g_mask)
    # y = h·scale + offset: the normalization and the affine folded into one FMA per element
    scale = _per_channel(member, rstd) * weight
    offset = bias - _per_channel(member, mean) * scale

    if ONE_TILE:
        y = _silu(h * scale[:, None] + offset[:, None], ACT)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        offset += shift * scale  # applied to x rather than h
        for s0 in range(0, S, BLOCK_S):
            mask = _tile_mask(c_mask, s0 + s, S, BLOCK_C, BLOCK_S, FULL_C, FULL_S)
            offs = sample + _offsets(c, s0 + s, C, S, CHANNELS_LAST)
            t = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = _silu(t * scale[:, None] + offset[:, None], ACT)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@autotuning.autotune(**_REGISTER_TILE)
@triton.jit
def _forward_partial_moments_kernel(
    x_ptr,        # (B, C, S) input, NCHW or NHWC order
    shift_ptr,    # (B, C) contiguous; read iff HAS_SHIFT
    moments_ptr,  # (3, B, G, NUM_SPLITS) fp32 output: count, mean, M2 per (sample, group, split)
    B, C, S, G, CPG, CPB, NUM_SPLITS,
    GPP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    FULL_C: tl.constexpr, FULL_S: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    """Grid (NUM_SPLITS, group blocks, B): moments of one [BLOCK_C, BLOCK_S] tile per program."""
    split = tl.program_id(0)
    gblk = tl.program_id(1)
    b = tl.program_id(2)
    c, c_mask, g, g_mask, member = _group_block(gblk, C, G, CPG, CPB, GPP, BLOCK_C, BLOCK_G)
    shift = _channel_vector(shift_ptr, b * C + c, c_mask, HAS_SHIFT, 0.0, BLOCK_C)
    s = split * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = _tile_mask(c_mask, s, S, BLOCK_C, BLOCK_S, FULL_C, FULL_S)
    offs = b.to(tl.int64) * C * S + _offsets(c, s, C, S, CHANNELS_LAST)
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + shift[:, None]
    h = tl.where(mask, h, 0.0)
    count, mean, m2 = _moments(h, mask, member, tl.minimum(S - split * BLOCK_S, BLOCK_S))
    at = (b * G + g) * NUM_SPLITS + split
    plane = B * G * NUM_SPLITS
    tl.store(moments_ptr + at, count, mask=g_mask)
    tl.store(moments_ptr + plane + at, mean, mask=g_mask)
    tl.store(moments_ptr + 2 * plane + at, m2, mask=g_mask)


@triton.jit
def _merge_splits(moments_ptr, rows, row_mask, ROWS, NUM_SPLITS, eps,
                  BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """mean, rstd [BLOCK_R] of the groups `rows` (indices into B·G) from their NUM_SPLITS
    partial (count, mean, M2) in moments_ptr (3, ROWS, NUM_SPLITS): exact, in two sweeps — the
    count-weighted mean first, then Σ M2_i + n_i·(mean_i − mean)²."""
    plane = ROWS * NUM_SPLITS
    n = tl.zeros([BLOCK_R, BLOCK_P], tl.float32)
    total = tl.zeros([BLOCK_R, BLOCK_P], tl.float32)
    for p0 in range(0, NUM_SPLITS, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = row_mask[:, None] & (p < NUM_SPLITS)[None, :]
        at = rows[:, None] * NUM_SPLITS + p[None, :]
        n_i = tl.load(moments_ptr + at, mask=mask, other=0.0)
        n += n_i
        total += n_i * tl.load(moments_ptr + plane + at, mask=mask, other=0.0)
    count = tl.maximum(tl.sum(n, axis=1), 1.0)
    mean = tl.sum(total, axis=1) / count
    m2 = tl.zeros([BLOCK_R, BLOCK_P], tl.float32)
    for p0 in range(0, NUM_SPLITS, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = row_mask[:, None] & (p < NUM_SPLITS)[None, :]
        at = rows[:, None] * NUM_SPLITS + p[None, :]
        delta = tl.load(moments_ptr + plane + at, mask=mask, other=0.0) - mean[:, None]
        m2 += (tl.load(moments_ptr + 2 * plane + at, mask=mask, other=0.0)
               + tl.load(moments_ptr + at, mask=mask, other=0.0) * delta * delta)
    return mean, tl.rsqrt(tl.sum(m2, axis=1) / count + eps)


@triton.jit
def _forward_merge_moments_kernel(
    moments_ptr,  # (3, B·G, NUM_SPLITS) fp32: count, mean, M2 per split
    mean_ptr,     # (B·G,) fp32 output
    rstd_ptr,     # (B·G,) fp32 output
    ROWS, NUM_SPLITS, eps,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (cdiv(B·G, BLOCK_R),): the moments of BLOCK_R groups per program."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mean, rstd = _merge_splits(moments_ptr, rows, rows < ROWS, ROWS, NUM_SPLITS, eps,
                               BLOCK_R, BLOCK_P)
    tl.store(mean_ptr + rows, mean, mask=rows < ROWS)
    tl.store(rstd_ptr + rows, rstd, mask=rows < ROWS)


@autotuning.autotune(**_STREAM)
@triton.jit
def _forward_normalize_kernel(
    x_ptr,        # (B, C, S) input, NCHW or NHWC order
    shift_ptr,    # (B, C) contiguous; read iff HAS_SHIFT
    weight_ptr,   # (C,); read iff HAS_WEIGHT
    bias_ptr,     # (C,); read iff HAS_BIAS
    moments_ptr,  # (3, B, G, NUM_SPLITS) fp32 partial moments; read iff MERGE
    mean_ptr,     # (B, G) fp32: read, or written by the split-0 programs iff MERGE
    rstd_ptr,     # (B, G) fp32: likewise
    y_ptr,        # (B, C, S) output, same order and dtype as x
    B, C, S, G, CPG, CPB, NUM_SPLITS, eps,
    GPP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr, MERGE: tl.constexpr, FULL_C: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_S), group blocks, B), visited back to front: the moments pass read
    the tensor front to back, so its last tiles are the likeliest still in L2. MERGE: each
    program merges its groups' few partial moments itself (GPP·NUM_SPLITS triples, a few
    hundred bytes from L2), which saves the merge kernel's launch."""
    split = tl.num_programs(0) - 1 - tl.program_id(0)
    gblk = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.num_programs(2) - 1 - tl.program_id(2)
    c, c_mask, g, g_mask, member = _group_block(gblk, C, G, CPG, CPB, GPP, BLOCK_C, BLOCK_G)
    shift = _channel_vector(shift_ptr, b * C + c, c_mask, HAS_SHIFT, 0.0, BLOCK_C)
    weight = _channel_vector(weight_ptr, c, c_mask, HAS_WEIGHT, 1.0, BLOCK_C)
    bias = _channel_vector(bias_ptr, c, c_mask, HAS_BIAS, 0.0, BLOCK_C)
    if MERGE:
        mean, rstd = _merge_splits(moments_ptr, b * G + g, g_mask, B * G, NUM_SPLITS, eps,
                                   BLOCK_G, BLOCK_P)
        if split == 0:  # one program per group block records the statistics for backward
            tl.store(mean_ptr + b * G + g, mean, mask=g_mask)
            tl.store(rstd_ptr + b * G + g, rstd, mask=g_mask)
    else:
        mean = tl.load(mean_ptr + b * G + g, mask=g_mask, other=0.0)
        rstd = tl.load(rstd_ptr + b * G + g, mask=g_mask, other=0.0)
    scale = _per_channel(member, rstd) * weight
    offset = bias + (shift - _per_channel(member, mean)) * scale
    s = split * BLOCK_S + tl.arange(0, BLOCK_S)
    # BLOCK_S is autotuned, so the spatial mask stays; with S % 16 == 0 (Triton specializes
    # that) it is uniform over 16 lanes and the accesses still vectorize
    mask = _tile_mask(c_mask, s, S, BLOCK_C, BLOCK_S, FULL_C, False)
    offs = b.to(tl.int64) * C * S + _offsets(c, s, C, S, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _silu(x * scale[:, None] + offset[:, None], ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _grad_tile(x_ptr, dy_ptr, offs, mask, x_scale, x_offset, weight, bias, ACT: tl.constexpr):
    """x̂ and dz of one tile (both zero outside `mask`); x̂ = x·x_scale + x_offset per channel."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, x * x_scale[:, None] + x_offset[:, None], 0.0)
    return xhat, _grad_z(xhat, dy, weight, bias, ACT)


@autotuning.autotune(**_REGISTER_TILE)
@triton.jit
def _backward_group_kernel(
    x_ptr,       # (B, C, S) forward input, NCHW or NHWC order
    dy_ptr,      # (B, C, S) grad of y, same order as x
    shift_ptr,   # (B, C) contiguous; read iff HAS_SHIFT
    weight_ptr,  # (C,); read iff HAS_WEIGHT
    bias_ptr,    # (C,); read iff HAS_BIAS
    mean_ptr,    # (B, G) fp32 from the forward
    rstd_ptr,    # (B, G) fp32 from the forward
    dx_ptr,      # (B, C, S) output, same order as x
    dshift_ptr,  # (B, C) output; written iff SHIFT_GRAD
    totals_ptr,  # (B, 2, C) fp32 output: Σ_s dz, Σ_s dz·x̂; written iff AFFINE_GRAD
    C, S, G, CPG, CPB,
    GPP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    ONE_TILE: tl.constexpr, FULL_C: tl.constexpr, FULL_S: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SHIFT_GRAD: tl.constexpr,
    AFFINE_GRAD: tl.constexpr,
):
    """Grid (group blocks, B). ONE_TILE keeps x̂ and dz in registers between the reduction and
    dx; otherwise a first loop reduces and a second recomputes x̂, dz and writes dx."""
    gblk = tl.program_id(0)
    b = tl.program_id(1)
    sample = b.to(tl.int64) * C * S
    c, c_mask, g, g_mask, member = _group_block(gblk, C, G, CPG, CPB, GPP, BLOCK_C, BLOCK_G)
    shift = _channel_vector(shift_ptr, b * C + c, c_mask, HAS_SHIFT, 0.0, BLOCK_C)
    weight = _channel_vector(weight_ptr, c, c_mask, HAS_WEIGHT, 1.0, BLOCK_C)
    bias = _channel_vector(bias_ptr, c, c_mask, HAS_BIAS, 0.0, BLOCK_C)
    rstd = tl.load(rstd_ptr + b * G + g, mask=g_mask, other=0.0)
    rstd_c = _per_channel(member, rstd)
    x_offset = (shift - _per_channel(member, tl.load(mean_ptr + b * G + g, mask=g_mask,
                                                     other=0.0))) * rstd_c
    s = tl.arange(0, BLOCK_S)

    if ONE_TILE:
        mask = _tile_mask(c_mask, s, S, BLOCK_C, BLOCK_S, FULL_C, FULL_S)
        offs = sample + _offsets(c, s, C, S, CHANNELS_LAST)
        xhat, dz = _grad_tile(x_ptr, dy_ptr, offs, mask, rstd_c, x_offset, weight, bias, ACT)
        sum_dz = tl.sum(dz, axis=1)
        sum_dzx = tl.sum(dz * xhat, axis=1)
        sum_xhat = tl.sum(xhat, axis=1)
    else:
        # The sums start from a zero computed at run time, not a constant. Triton's thread-locality
        # pass rewrites a loop accumulator that starts from a constant and adds the reduction of
        # a loaded tile (dz is dy itself when act=False and dy is fp32); Triton 3.6 and 3.8 then
        # assert that the loop's result has a single use (OptimizeThreadLocality.cpp,
        # `loopResult.hasOneUse()`), and Σ dz has two or three (the dx terms, dshift, totals):
        # that loop path failed to compile. c_mask depends on the program id, so this zero is
        # never folded into a constant; the pass leaves the loop alone, and the code is otherwise
        # what zeros give (same registers at every config; kernels/compile_check.py checks it).
        zero = c_mask.to(tl.float32) * 0.0
        sum_dz = zero
        sum_dzx = zero
        sum_xhat = zero
        for s0 in range(0, S, BLOCK_S):
            mask = _tile_mask(c_mask, s0 + s, S, BLOCK_C, BLOCK_S, FULL_C, FULL_S)
            offs = sample + _offsets(c, s0 + s, C, S, CHANNELS_LAST)
            t_xhat, t_dz = _grad_tile(x_ptr, dy_ptr, offs, mask, rstd_c, x_offset, weight, bias,
                                      ACT)
            sum_dz += tl.sum(t_dz, axis=1)
            sum_dzx += tl.sum(t_dz * t_xhat, axis=1)
            sum_xhat += tl.sum(t_xhat, axis=1)

    a, q, dshift = _input_grad_terms(sum_dz, sum_dzx, sum_xhat, member, weight, rstd, rstd_c,
                                     CPG, S)
    if SHIFT_GRAD:
        tl.store(dshift_ptr + b * C + c, dshift.to(dshift_ptr.dtype.element_ty), mask=c_mask)
    if AFFINE_GRAD:
        tl.store(totals_ptr + b * 2 * C + c, sum_dz, mask=c_mask)
        tl.store(totals_ptr + b * 2 * C + C + c, sum_dzx, mask=c_mask)
    dz_scale = rstd_c * weight

    if ONE_TILE:
        dx = dz * dz_scale[:, None] - a[:, None] - xhat * q[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        for s0 in range(0, S, BLOCK_S):
            mask = _tile_mask(c_mask, s0 + s, S, BLOCK_C, BLOCK_S, FULL_C, FULL_S)
            offs = sample + _offsets(c, s0 + s, C, S, CHANNELS_LAST)
            t_xhat, t_dz = _grad_tile(x_ptr, dy_ptr, offs, mask, rstd_c, x_offset, weight, bias,
                                      ACT)
            dx = t_dz * dz_scale[:, None] - a[:, None] - t_xhat * q[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@autotuning.autotune(**_REGISTER_TILE)
@triton.jit
def _backward_partial_sums_kernel(
    x_ptr,       # (B, C, S) forward input, NCHW or NHWC order
    dy_ptr,      # (B, C, S) grad of y, same order as x
    shift_ptr,   # (B, C) contiguous; read iff HAS_SHIFT
    weight_ptr,  # (C,); read iff HAS_WEIGHT
    bias_ptr,    # (C,); read iff HAS_BIAS
    mean_ptr,    # (B, G) fp32
    rstd_ptr,    # (B, G) fp32
    sums_ptr,    # (B, NUM_SPLITS, 3, C) fp32 output: Σ dz, Σ dz·x̂, Σ x̂ over the split's positions
    C, S, G, CPG, CPB, NUM_SPLITS,
    GPP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    FULL_C: tl.constexpr, FULL_S: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
):
    """Grid (NUM_SPLITS, group blocks, B): per-channel sums of one tile per program."""
    split = tl.program_id(0)
    gblk = tl.program_id(1)
    b = tl.program_id(2)
    c, c_mask, g, g_mask, member = _group_block(gblk, C, G, CPG, CPB, GPP, BLOCK_C, BLOCK_G)
    shift = _channel_vector(shift_ptr, b * C + c, c_mask, HAS_SHIFT, 0.0, BLOCK_C)
    weight = _channel_vector(weight_ptr, c, c_mask, HAS_WEIGHT, 1.0, BLOCK_C)
    bias = _channel_vector(bias_ptr, c, c_mask, HAS_BIAS, 0.0, BLOCK_C)
    rstd_c = _per_channel(member, tl.load(rstd_ptr + b * G + g, mask=g_mask, other=0.0))
    mean_c = _per_channel(member, tl.load(mean_ptr + b * G + g, mask=g_mask, other=0.0))
    s = split * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = _tile_mask(c_mask, s, S, BLOCK_C, BLOCK_S, FULL_C, FULL_S)
    offs = b.to(tl.int64) * C * S + _offsets(c, s, C, S, CHANNELS_LAST)
    xhat, dz = _grad_tile(x_ptr, dy_ptr, offs, mask, rstd_c, (shift - mean_c) * rstd_c, weight,
                          bias, ACT)
    row = sums_ptr + ((b * NUM_SPLITS + split) * 3) * C + c
    tl.store(row, tl.sum(dz, axis=1), mask=c_mask)
    tl.store(row + C, tl.sum(dz * xhat, axis=1), mask=c_mask)
    tl.store(row + 2 * C, tl.sum(xhat, axis=1), mask=c_mask)


@triton.jit
def _backward_group_terms_kernel(
    sums_ptr,    # (B, NUM_SPLITS, 3, C) fp32: per-split Σ dz, Σ dz·x̂, Σ x̂
    weight_ptr,  # (C,); read iff HAS_WEIGHT
    rstd_ptr,    # (B, G) fp32
    terms_ptr,   # (2, B, C) fp32 output: a, q of dx = rstd·w·dz − a − q·x̂ per (sample, channel)
    totals_ptr,  # (B, 2, C) fp32 output: Σ_s dz, Σ_s dz·x̂ per (sample, channel)
    dshift_ptr,  # (B, C) output; written iff SHIFT_GRAD
    B, C, G, CPG, S, NUM_SPLITS,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, SHIFT_GRAD: tl.constexpr,
):
    """Grid (G, B), one group per program whatever the tiles were: total the splits' sums
    ([BLOCK_P, BLOCK_C] at a time) and turn them into the dx terms and dshift of each channel."""
    g = tl.program_id(0)
    b = tl.program_id(1)
    c, c_mask, _, _, member = _group_block(g, C, G, CPG, CPG, 1, BLOCK_C, 1)
    weight = _channel_vector(weight_ptr, c, c_mask, HAS_WEIGHT, 1.0, BLOCK_C)
    rstd = tl.load(rstd_ptr + b * G + g + tl.arange(0, 1))  # [BLOCK_G = 1]
    sum_dz = tl.zeros([BLOCK_C], tl.float32)
    sum_dzx = tl.zeros([BLOCK_C], tl.float32)
    sum_xhat = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, NUM_SPLITS, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < NUM_SPLITS)[:, None] & c_mask[None, :]
        rows = sums_ptr + ((b * NUM_SPLITS + p) * 3 * C)[:, None] + c[None, :]
        sum_dz += tl.sum(tl.load(rows, mask=mask, other=0.0), axis=0)
        sum_dzx += tl.sum(tl.load(rows + C, mask=mask, other=0.0), axis=0)
        sum_xhat += tl.sum(tl.load(rows + 2 * C, mask=mask, other=0.0), axis=0)
    a, q, dshift = _input_grad_terms(sum_dz, sum_dzx, sum_xhat, member, weight, rstd,
                                     _per_channel(member, rstd), CPG, S)
    tl.store(terms_ptr + b * C + c, a, mask=c_mask)
    tl.store(terms_ptr + B * C + b * C + c, q, mask=c_mask)
    tl.store(totals_ptr + b * 2 * C + c, sum_dz, mask=c_mask)
    tl.store(totals_ptr + b * 2 * C + C + c, sum_dzx, mask=c_mask)
    if SHIFT_GRAD:
        tl.store(dshift_ptr + b * C + c, dshift.to(dshift_ptr.dtype.element_ty), mask=c_mask)


@autotuning.autotune(**_STREAM)
@triton.jit
def _backward_input_grad_kernel(
    x_ptr,       # (B, C, S) forward input, NCHW or NHWC order
    dy_ptr,      # (B, C, S) grad of y, same order as x
    shift_ptr,   # (B, C) contiguous; read iff HAS_SHIFT
    weight_ptr,  # (C,); read iff HAS_WEIGHT
    bias_ptr,    # (C,); read iff HAS_BIAS
    mean_ptr,    # (B, G) fp32
    rstd_ptr,    # (B, G) fp32
    terms_ptr,   # (2, B, C) fp32: a, q per (sample, channel)
    dx_ptr,      # (B, C, S) output, same order as x
    B, C, S, G, CPG, CPB,
    GPP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    FULL_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_S), group blocks, B), back to front as in the forward."""
    split = tl.num_programs(0) - 1 - tl.program_id(0)
    gblk = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.num_programs(2) - 1 - tl.program_id(2)
    c, c_mask, g, g_mask, member = _group_block(gblk, C, G, CPG, CPB, GPP, BLOCK_C, BLOCK_G)
    shift = _channel_vector(shift_ptr, b * C + c, c_mask, HAS_SHIFT, 0.0, BLOCK_C)
    weight = _channel_vector(weight_ptr, c, c_mask, HAS_WEIGHT, 1.0, BLOCK_C)
    bias = _channel_vector(bias_ptr, c, c_mask, HAS_BIAS, 0.0, BLOCK_C)
    rstd_c = _per_channel(member, tl.load(rstd_ptr + b * G + g, mask=g_mask, other=0.0))
    mean_c = _per_channel(member, tl.load(mean_ptr + b * G + g, mask=g_mask, other=0.0))
    a = tl.load(terms_ptr + b * C + c, mask=c_mask, other=0.0)
    q = tl.load(terms_ptr + B * C + b * C + c, mask=c_mask, other=0.0)
    s = split * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = _tile_mask(c_mask, s, S, BLOCK_C, BLOCK_S, FULL_C, False)  # BLOCK_S is autotuned
    offs = b.to(tl.int64) * C * S + _offsets(c, s, C, S, CHANNELS_LAST)
    xhat, dz = _grad_tile(x_ptr, dy_ptr, offs, mask, rstd_c, (shift - mean_c) * rstd_c, weight,
                          bias, ACT)
    dx = dz * (rstd_c * weight)[:, None] - a[:, None] - xhat * q[:, None]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_grad_kernel(
    totals_ptr,   # (B, 2, C) fp32: [b, 0, c] = Σ_s dz, [b, 1, c] = Σ_s dz·x̂
    dweight_ptr,  # (C,) output; written iff WEIGHT_GRAD
    dbias_ptr,    # (C,) output; written iff BIAS_GRAD
    B, C,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C),): dweight, dbias = sums over the batch in a fixed order, so the
    result is deterministic (no atomics)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    dweight = tl.zeros([BLOCK_C], tl.float32)
    dbias = tl.zeros([BLOCK_C], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mask = (b < B)[:, None] & (c < C)[None, :]
        rows = totals_ptr + (b * 2 * C)[:, None] + c[None, :]
        dbias += tl.sum(tl.load(rows, mask=mask, other=0.0), axis=0)
        dweight += tl.sum(tl.load(rows + C, mask=mask, other=0.0), axis=0)
    if WEIGHT_GRAD:
        tl.store(dweight_ptr + c, dweight.to(dweight_ptr.dtype.element_ty), mask=c < C)
    if BIAS_GRAD:
        tl.store(dbias_ptr + c, dbias.to(dbias_ptr.dtype.element_ty), mask=c < C)


# ---------------------------------------------------------------------------------------------
# Planning and launchers
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tuning:
    """Thresholds of `plan()`. Tests lower them to reach every path with small tensors."""
    register_tile: int = 16384           # fwd: largest group block held in registers (fp32)
    register_tile_backward: int = 8192   # bwd holds x̂ and dz: half as many
    loop_tile: int = 4096                # tile of the looping kernels
    split_tile: int = 4096               # elements per program when groups are split
    nhwc_row_channels: int = 64          # NHWC: channels per tile row (a contiguous run)
    small_group: int = 1024              # NCHW: pack groups smaller than this
    inline_merge: int = 64               # split fwd: normalizing programs merge their groups'
                                         # partial moments themselves when a block has at most
                                         # this many (groups × splits); else a merge kernel
    min_programs: int | None = None      # fewer (group-block) programs than this → split;
                                         # None: half the SM count. A guess that keeps one
                                         # launch down to ~1 program per SM; bench/ should
                                         # confirm it on the H100


TUNING = Tuning()


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call runs: strategy 'tile' | 'loop' | 'split' and the tile geometry."""
    strategy: str
    groups_per_block: int   # GPP
    num_blocks: int         # group blocks per sample
    block_c: int
    block_g: int
    block_s: int            # tile width; for 'split', the width of one split
    num_splits: int         # spatial splits per group block ('split' only, else 1)
    inline_merge: bool      # 'split' fwd: no separate merge kernel (see Tuning.inline_merge)
    full_c: bool            # every group block fills BLOCK_C (no channel mask)
    full_s: bool            # BLOCK_S divides S (no spatial mask)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """SMs of the device (queried once per device, never at import)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: there is no parallel machine to fill


def plan(batch: int, channels: int, spatial: int, groups: int, channels_last: bool,
         multiprocessors: int, backward: bool = False, tuning: Tuning | None = None) -> Plan:
    """Choose the strategy and tile for a (batch, channels, spatial) problem; see the module doc."""
    t = tuning or TUNING
    cpg = channels // groups
    if channels_last:
        gpp = max(1, min(groups, t.nhwc_row_channels // cpg))
        # prefer a multiple of 16 channels per block: masked NHWC rows then still vectorize
        step = 16 // math.gcd(cpg, 16)
        if step <= groups:
            gpp = max(step, gpp // step * step)
    else:
        gpp = max(1, min(groups, t.small_group // (cpg * spatial)))
    block_c = triton.next_power_of_2(gpp * cpg)
    block_g = triton.next_power_of_2(gpp)
    num_blocks = triton.cdiv(groups, gpp)
    full_c = gpp * cpg == block_c and groups % gpp == 0
    width = triton.next_power_of_2(spatial)
    # narrowest useful tile row: 16 elements (a 32-byte sector in bf16) or the whole extent
    min_width = min(16, width)

    def tile_width(elements: int) -> int:
        return min(width, max(min_width, triton.next_power_of_2(max(1, elements // block_c))))

    programs = batch * num_blocks
    min_programs = t.min_programs if t.min_programs is not None else max(1, multiprocessors // 2)
    register_tile = t.register_tile_backward if backward else t.register_tile
    split_width = tile_width(t.split_tile)
    num_splits = triton.cdiv(spatial, split_width)

    if programs < min_programs and num_splits > 1:
        strategy, block_s = "split", split_width
    elif block_c * width <= register_tile:
        strategy, block_s, num_splits = "tile", width, 1
    else:
        strategy, block_s, num_splits = "loop", tile_width(t.loop_tile), 1
    return Plan(strategy, gpp, num_blocks, block_c, block_g, block_s, num_splits,
                gpp * num_splits <= t.inline_merge, full_c, spatial % block_s == 0)


def memory_order(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x or a contiguous copy, channels_last): the kernels read NCHW and NHWC (channels last,
    any number of spatial dims) in place; any other strides are copied to NCHW first."""
    if x.is_contiguous():
        return x, False
    if x.dim() > 2 and x.movedim(1, -1).is_contiguous():
        return x, True
    return x.contiguous(), False


def _in_order(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t in the given memory order (a copy only if it is not already)."""
    if channels_last:
        if t.movedim(1, -1).is_contiguous():
            return t
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _check(x: torch.Tensor, num_groups: int) -> tuple[int, int, int]:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"groupnorm_silu: the Triton kernels take float32, float16 or bfloat16 "
                        f"x (float64 is computed in float32, as the reference does), got "
                        f"{x.dtype}; convert x first")
    # Concrete ints: the plan (strategy, tile, constexprs) is per shape, so under torch.compile
    # with dynamic shapes this specializes on the sizes instead of passing SymInt constexprs.
    batch, channels = int(x.shape[0]), int(x.shape[1])
    spatial = int(math.prod(x.shape[2:]))
    if channels * spatial >= 2 ** 31:
        raise ValueError(f"groupnorm_silu: one sample of {channels}×{spatial} elements is too "
                         "large for 32-bit in-sample offsets; split the image into tiles")
    return batch, channels, spatial


def forward_outputs(x: torch.Tensor, num_groups: int):
    """Uninitialized (y, mean, rstd) exactly as forward() returns them (also the fake impl)."""
    x, _ = memory_order(x)
    mean = x.new_empty(x.shape[0], num_groups, dtype=torch.float32)
    return torch.empty_like(x), mean, torch.empty_like(mean)


def backward_outputs(x, weight, bias, shift, shift_grad: bool, affine_grad: bool):
    """Uninitialized (dx, dweight, dbias, dshift) exactly as backward() returns them: None for
    a gradient not asked for or of an absent tensor (also the fake impl)."""
    x, _ = memory_order(x)
    return (torch.empty_like(x),
            torch.empty_like(weight) if affine_grad and weight is not None else None,
            torch.empty_like(bias) if affine_grad and bias is not None else None,
            torch.empty_like(shift) if shift_grad and shift is not None else None)


def _optional_inputs(shift, weight, bias, placeholder: torch.Tensor):
    """shift, weight, bias as the kernels read them (contiguous; `placeholder` when absent) and
    the HAS_ flags. Every use of an optional pointer sits behind its constexpr flag, so the
    placeholder is never read. Kernels are never passed None: torch.export and AOTInductor have
    had repeated bugs with None arguments to user Triton kernels (pytorch#115344, #138546)."""
    return (shift.contiguous() if shift is not None else placeholder,
            weight.contiguous() if weight is not None else placeholder,
            bias.contiguous() if bias is not None else placeholder,
            dict(HAS_SHIFT=shift is not None, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None))


def _unused_output(like: torch.Tensor) -> torch.Tensor:
    """An empty stand-in for an output pointer the kernel's flags say it never writes."""
    return like.new_empty(0, dtype=torch.float32)


def forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
            bias: torch.Tensor | None, eps: float, shift: torch.Tensor | None, act: bool,
            tuning: Tuning | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean (B, G) fp32, rstd (B, G) fp32. y has x's dtype and memory order."""
    batch, channels, spatial = _check(x, num_groups)
    x, channels_last = memory_order(x)
    y, mean, rstd = forward_outputs(x, num_groups)
    if x.numel() == 0:
        return y, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    p = plan(batch, channels, spatial, num_groups, channels_last, _multiprocessors(x.device),
             tuning=tuning)
    shift_t, weight_t, bias_t, has = _optional_inputs(shift, weight, bias, placeholder=mean)
    geometry = dict(GPP=p.groups_per_block, BLOCK_C=p.block_c, BLOCK_G=p.block_g,
                    FULL_C=p.full_c, CHANNELS_LAST=channels_last)
    cpg = channels // num_groups
    cpb = cpg * p.groups_per_block

    if p.strategy != "split":
        wrap_triton(_forward_group_kernel)[(p.num_blocks, batch)](
            x, shift_t, weight_t, bias_t, y, mean, rstd, channels, spatial, num_groups, cpg, cpb,
            eps,
            BLOCK_S=p.block_s, ONE_TILE=p.strategy == "tile", FULL_S=p.full_s, ACT=act,
            **geometry, **has)
        return y, mean, rstd

    moments = torch.empty(3, batch, num_groups, p.num_splits, device=x.device,
                          dtype=torch.float32)
    wrap_triton(_forward_partial_moments_kernel)[(p.num_splits, p.num_blocks, batch)](
        x, shift_t, moments, batch, channels, spatial, num_groups, cpg, cpb, p.num_splits,
        BLOCK_S=p.block_s, FULL_S=p.full_s, HAS_SHIFT=has["HAS_SHIFT"],
        **geometry)
    # Few partials per group block (NCHW: one group × a few splits): every normalizing
    # program merges them itself. Many (NHWC blocks of 32 groups × 256 splits): merge once.
    block_p = min(triton.next_power_of_2(p.num_splits), 1024)
    if not p.inline_merge:
        block_r = max(1, min(triton.next_power_of_2(batch * num_groups), 1024 // block_p))
        wrap_triton(_forward_merge_moments_kernel)[(triton.cdiv(batch * num_groups, block_r),)](
            moments, mean, rstd, batch * num_groups, p.num_splits, eps,
            BLOCK_R=block_r, BLOCK_P=block_p)

    def grid(meta):
        return (triton.cdiv(spatial, meta["BLOCK_S"]), p.num_blocks, batch)
    wrap_triton(_forward_normalize_kernel)[grid](
        x, shift_t, weight_t, bias_t, moments, mean, rstd, y,
        batch, channels, spatial, num_groups, cpg, cpb, p.num_splits, eps,
        BLOCK_P=min(block_p, max(1, 256 // p.block_g)), MERGE=p.inline_merge, ACT=act,
        **geometry, **has)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
             num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
             shift: torch.Tensor | None, act: bool, shift_grad: bool, affine_grad: bool,
             tuning: Tuning | None = None):
    """(dx, dweight, dbias, dshift); dweight/dbias are None unless affine_grad and the tensor
    exists, dshift None unless shift_grad and shift exists. dx has x's memory order."""
    batch, channels, spatial = _check(x, num_groups)
    x, channels_last = memory_order(x)
    dy = _in_order(dy, channels_last)
    dx, dweight, dbias, dshift = backward_outputs(x, weight, bias, shift, shift_grad, affine_grad)
    shift_grad, weight_grad, bias_grad = dshift is not None, dweight is not None, dbias is not None
    affine_grad = weight_grad or bias_grad
    if x.numel() == 0:
        for t in (dx, dshift, dweight, dbias):
            if t is not None:
                t.zero_()
        return dx, dweight, dbias, dshift
    p = plan(batch, channels, spatial, num_groups, channels_last, _multiprocessors(x.device),
             backward=True, tuning=tuning)
    shift_t, weight_t, bias_t, has = _optional_inputs(shift, weight, bias, placeholder=mean)
    geometry = dict(GPP=p.groups_per_block, BLOCK_C=p.block_c, BLOCK_G=p.block_g,
                    FULL_C=p.full_c, CHANNELS_LAST=channels_last)
    cpg = channels // num_groups
    cpb = cpg * p.groups_per_block
    # per-(sample, channel) Σ_s dz, Σ_s dz·x̂: the input of the dweight/dbias reduction
    totals = (torch.empty(batch, 2, channels, device=x.device, dtype=torch.float32)
              if affine_grad or p.strategy == "split" else _unused_output(x))
    dshift_t = dshift if dshift is not None else _unused_output(x)

    if p.strategy != "split":
        wrap_triton(_backward_group_kernel)[(p.num_blocks, batch)](
            x, dy, shift_t, weight_t, bias_t, mean, rstd, dx, dshift_t, totals,
            channels, spatial, num_groups, cpg, cpb,
            BLOCK_S=p.block_s, ONE_TILE=p.strategy == "tile", FULL_S=p.full_s, ACT=act,
            SHIFT_GRAD=shift_grad, AFFINE_GRAD=affine_grad, **geometry, **has)
    else:
        sums = torch.empty(batch, p.num_splits, 3, channels, device=x.device,
                           dtype=torch.float32)
        wrap_triton(_backward_partial_sums_kernel)[(p.num_splits, p.num_blocks, batch)](
            x, dy, shift_t, weight_t, bias_t, mean, rstd, sums,
            channels, spatial, num_groups, cpg, cpb, p.num_splits,
            BLOCK_S=p.block_s, FULL_S=p.full_s, ACT=act, **geometry, **has)
        terms = torch.empty(2, batch, channels, device=x.device, dtype=torch.float32)
        group_c = triton.next_power_of_2(cpg)
        wrap_triton(_backward_group_terms_kernel)[(num_groups, batch)](
            sums, weight_t, rstd, terms, totals, dshift_t,
            batch, channels, num_groups, cpg, spatial, p.num_splits, BLOCK_C=group_c,
            BLOCK_P=max(1, min(triton.next_power_of_2(p.num_splits), 4096 // group_c)),
            HAS_WEIGHT=has["HAS_WEIGHT"], SHIFT_GRAD=shift_grad)

        def grid(meta):
            return (triton.cdiv(spatial, meta["BLOCK_S"]), p.num_blocks, batch)
        wrap_triton(_backward_input_grad_kernel)[grid](
            x, dy, shift_t, weight_t, bias_t, mean, rstd, terms, dx,
            batch, channels, spatial, num_groups, cpg, cpb, ACT=act, **geometry, **has)

    if affine_grad:
        block_c = min(128, triton.next_power_of_2(channels))
        wrap_triton(_affine_grad_kernel)[(triton.cdiv(channels, block_c),)](
            totals, dweight if weight_grad else _unused_output(x),
            dbias if bias_grad else _unused_output(x), batch, channels,
            BLOCK_B=min(32, triton.next_power_of_2(batch)), BLOCK_C=block_c,
            WEIGHT_GRAD=weight_grad, BIAS_GRAD=bias_grad)
    return dx, dweight, dbias, dshift
