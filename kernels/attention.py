"""Attention for one wide head: O = softmax(Q Kᵀ · scale) V, and its backward, in Triton.

Shapes: Q (B, H, Lq, d), K and V (B, H, Lk, d), any strides (the U-Net passes strided views of
its qkv convolution, stride 1 along L). SR3 runs ONE head whose width is the channel count:
d = 512 at L = 256 (16→128 model), d = 1024 at L = 1024 (64→512 model); L ≤ 4096 in general.

Why two phases instead of FlashAttention
----------------------------------------
FlashAttention keeps a BLOCK_M × d fp32 output accumulator in registers for the whole key loop.
At d = 1024 that is 512 KiB for BLOCK_M = 128, twice an H100 SM's register file, so the output's
d must be split across programs. Splitting it inside a flash kernel makes every program recompute
its full-width scores Q Kᵀ: the QKᵀ FLOPs grow by d / BLOCK_D (8× at d = 1024, BLOCK_D = 128),
and total FLOPs by (8 + 1) / 2 = 4.5×. Instead we split the work at the scores:

  phase 1  `_scores_kernel`, grid (Lk/BN, Lq/BM, B·H): one BM × BN tile of S = Q Kᵀ · scale,
           reduced over d in BLOCK_D chunks; then the tile's own softmax statistics
           m = rowmax(S), l = rowsum(exp(S − m)), and P̃ = exp(S − m) stored in the input dtype.
  phase 2  `_pv_kernel`, grid (d/BD, Lq/BM, B·H): merges its rows' per-tile (m, l) into the row
           logsumexp, then O[:, d-tile] = Σ_tiles (P̃ · exp(m_tile − lse)) V[:, d-tile].

Both phases are plain tensor-core GEMMs with a small epilogue / prologue, no FLOP is repeated,
and both grids have many programs (phase 1 gets parallelism from the key axis, phase 2 from d).
Cost per (batch, head) in bf16 (FLOPs: 2·Lq·Lk·d per GEMM):

  shape              FLOPs      Q,K,V,O bytes   P̃ scratch (written once, read d/BD times, L2)
  d=512,  L=256      134 M      1.0 MiB         128 KiB
  d=1024, L=1024     4.29 G     8.0 MiB         2.0 MiB

At d=1024, L=1024 that is 4.3 µs of tensor-core time at 990 TFLOP/s and ~3.1 µs of HBM time
(8 MiB + 2 MiB of P̃ at 3.35 TB/s), against ~19 µs of FLOPs for the split-d flash kernel. The
materialised P̃ is 2 bytes per score (32 MiB per head at L = 4096): acceptable at SR3's lengths,
and what F.scaled_dot_product_attention's math fallback also materialises (its flash kernels
stop at d = 256), minus that fallback's separate softmax pass over the scores. Exponentials are
taken once, in phase 1, each amortised over a d-long dot product; phase 2 only multiplies P̃ by
one factor per (row, key tile) before its tensor-core dot, where a flash kernel would take the
exponentials and rescale its BM × d accumulator.

Numerics: scores are kept in log2 units (s · log2 e) so every exponential is one exp2; softmax
statistics and all accumulators are fp32 (DESIGN.md rule 4). fp16/bf16 operands use tensor cores
(P̃ and dS are rounded to the input dtype before their GEMMs, as in FlashAttention); fp32 operands
use exact fp32 dots (`input_precision="ieee"`, no TF32) so fp32 results match the fp32 reference
to summation order.

Backward (training): `lse` (fp32, natural log, per row) is saved by the forward and P recomputed:
  `_grad_scores_kernel`, grid (Lk/BN, Lq/BM, B·H): one d loop computes S and dP = dO Vᵀ for the
           tile, plus δ = rowsum(dO ⊙ O) (recomputed per tile: BM·d FMAs against 2·BM·BN·d for the
           two dots); P = exp(S − lse), dS = P ⊙ (dP − δ) · scale; stores P and dS (input dtype).
  `_matmul_kernel` ×3, grid (d/BN, rows/BM, B·H): dV = Pᵀ dO, dK = dSᵀ Q, dQ = dS K, each tiled
           over d, reading Pᵀ and dSᵀ in place (transposed strides) — no transposes, no copies.

Layout: inputs are read in place through their strides (Triton specialises a stride equal to 1,
so loads vectorise along whichever of L or d is contiguous). Outputs take the axis order of the
matching input (L-fastest for the U-Net's views), so the caller's reshape back to (B, C, H, W)
stays a view. Scratch buffers are padded to whole tiles, so only loads and stores of the caller's
tensors are masked, and only along the axes whose length is not a multiple of every block size.

Autotuning (kernels/autotuning.py): configs are keyed on the problem shape and operand dtype; the
first call at a new shape benchmarks the candidates that fit the dtype's register and shared
memory budgets, at most MAX_CANDIDATES per kernel (run it once before capturing a CUDA graph;
SR3FAST_TRITON_AUTOTUNE=pinned takes the first instead). Under TRITON_INTERPRET=1 (CPU tests)
each kernel runs one small config of its own, so small shapes still exercise the tile loops,
partial tiles and statistics merging; the GPU configs stay listed (GPU_CONFIGS) for tests that
force each one. KEY_BLOCK and the scratch padding are the same in both modes.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

from . import autotuning
from .compat import wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


def _cfg(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Key tile width shared by both forward phases: the granularity of the partial softmax statistics.
# 64 keeps phase 1 at 128×64 tiles, ~one full wave of 132 SMs at d=1024, L=1024, batch 1. One
# value everywhere (the CPU interpreter too), so every config runs the tiles it runs on a GPU.
KEY_BLOCK = 64

# GPU configs, in order of preference (pinned autotuning takes the first one that fits the dtype).
# Phase 1 is a GEMM over d with a softmax epilogue: 128-row tiles amortise K loads, 64-row tiles
# give more programs at L = 256.
_SCORES_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_D=64),
    _cfg(4, 4, BLOCK_M=128, BLOCK_D=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_D=128),
    _cfg(4, 4, BLOCK_M=64, BLOCK_D=64),
    _cfg(4, 3, BLOCK_M=64, BLOCK_D=128),
]

# Phase 2 is a GEMM over keys: the output tile BM × BD is its register accumulator.
_PV_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_D=128),
    _cfg(8, 3, BLOCK_M=128, BLOCK_D=256),
    _cfg(4, 4, BLOCK_M=128, BLOCK_D=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_D=128),
    _cfg(4, 4, BLOCK_M=64, BLOCK_D=64),
]

# Backward scores: two BM × KEY_BLOCK accumulators (S and dP) and five operand tiles per d chunk.
_GRAD_SCORES_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_D=64),
    _cfg(4, 3, BLOCK_M=64, BLOCK_D=64),
    _cfg(8, 4, BLOCK_M=128, BLOCK_D=32),
    _cfg(4, 4, BLOCK_M=64, BLOCK_D=32),
    # for fp32, whose 3- and 4-stage 128-row configs above exceed shared memory
    _cfg(8, 2, BLOCK_M=128, BLOCK_D=32),
]

_MATMUL_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
]

# The CPU interpreter's default tiles: 32 rows and a 32-wide d (or k) chunk, so small test shapes
# still cross row, d and key tile edges; it runs nothing else unless a test forces a GPU config.
_INTERPRETER_CONFIGS = {
    "scores": _cfg(4, 1, BLOCK_M=32, BLOCK_D=32),
    "pv": _cfg(4, 1, BLOCK_M=32, BLOCK_D=32),
    "grad_scores": _cfg(4, 1, BLOCK_M=32, BLOCK_D=32),
    "matmul": _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
}
GPU_CONFIGS = {"scores": _SCORES_CONFIGS, "pv": _PV_CONFIGS,
               "grad_scores": _GRAD_SCORES_CONFIGS, "matmul": _MATMUL_CONFIGS}
# What each autotuner is given: the interpreter's config first, then the GPU's; `_prune` keeps
# the first only under the interpreter and drops it on a GPU.
_CANDIDATES = {name: [_INTERPRETER_CONFIGS[name], *configs] for name, configs in GPU_CONFIGS.items()}


def _largest(configs: list[triton.Config], name: str) -> int:
    return max(config.kwargs[name] for config in configs)


def _multiple(n: int, configs: list[triton.Config], name: str) -> bool:
    """Whether n is a multiple of every candidate `name` block (all powers of two), so a kernel
    may drop the bounds mask on that axis whichever config the autotuner picks or a test forces."""
    return n % _largest(configs, name) == 0


# Scratch rows are padded to the largest row block of any kernel that reads or writes scratch
# rows, so those kernels store whole tiles unmasked; Lq a multiple of it drops every row mask.
_ROW_ALIGN = max(_largest(_CANDIDATES[name], "BLOCK_M") for name in ("scores", "pv", "grad_scores"))


# ---- which configs may run, per operand dtype ---------------------------------------------------
# One program's budgets on an H100/H200 (sm_90): 255 registers per thread, 227 KiB of shared
# memory per block. With threads = 32 · num_warps, for a config:
#   accumulator registers per thread = accumulator elements / threads            (fp32 each)
#   operand registers per thread     = elements of the operand tiles loaded per loop step / threads
#   shared memory = num_stages · bytes of those operand tiles (one copy per pipeline stage)
# 16-bit operands: tensor-core dots read their operands from shared memory, so only the
#   accumulator lives in registers: at most 128 per thread, half the file, as in Triton's own
#   128×256, 8-warp bf16 matmul. (H200, Triton 3.6: every config listed below compiled at SR3's
#   shapes with 64 to 214 registers and no spills.)
# fp32 operands: exact fp32 dots (no TF32) run as FMAs, which hold each thread's slices of both
#   operand tiles in registers beside the accumulator: accumulator + operands at most 160 per
#   thread. Measured on the H200: configs at 192 to 224 (PV and matmul 128×256 tiles, 8 warps;
#   backward scores with 64-wide d chunks) hit 255 registers and spilled 296 to 372; those at
#   ≤ 160 spilled at most 4. (fp32 pipelines keep num_stages − 1 copies in shared memory, so the
#   formula above over-counts them by one stage: a safe bound.)
SHARED_MEMORY_BYTES = 227 * 1024
REGISTER_BUDGET = {2: 128, 4: 160}  # by operand element size (bytes); what each budget counts: above
# Autotuning compiles and times every candidate at each new shape: a few per kernel and dtype.
MAX_CANDIDATES = 4


def tile_footprint(kernel: str, config: triton.Config) -> tuple[int, int]:
    """(fp32 accumulator elements, operand elements loaded per loop step) of one program."""
    blocks = config.kwargs
    rows = blocks["BLOCK_M"]
    if kernel == "scores":       # S tile; Q chunk and Kᵀ chunk
        return rows * KEY_BLOCK, (rows + KEY_BLOCK) * blocks["BLOCK_D"]
    if kernel == "pv":           # O tile; P̃ tile and V tile
        return rows * blocks["BLOCK_D"], (rows + blocks["BLOCK_D"]) * KEY_BLOCK
    if kernel == "grad_scores":  # S and dP tiles; Q, dO, O chunks and Kᵀ, Vᵀ chunks
        return 2 * rows * KEY_BLOCK, (3 * rows + 2 * KEY_BLOCK) * blocks["BLOCK_D"]
    if kernel == "matmul":       # C tile; A and B chunks
        return rows * blocks["BLOCK_N"], (rows + blocks["BLOCK_N"]) * blocks["BLOCK_K"]
    raise ValueError(kernel)


def resources(kernel: str, config: triton.Config, element_size: int) -> tuple[float, int]:
    """(registers per thread, shared memory bytes) of a config, counted as budgeted above."""
    accumulator, operands = tile_footprint(kernel, config)
    in_registers = accumulator if element_size < 4 else accumulator + operands
    return in_registers / (32 * config.num_warps), config.num_stages * operands * element_size


def fits(kernel: str, config: triton.Config, element_size: int) -> bool:
    registers, shared = resources(kernel, config, element_size)
    return registers <= REGISTER_BUDGET[min(element_size, 4)] and shared <= SHARED_MEMORY_BYTES


def candidates(kernel: str, configs: list[triton.Config], element_size: int,
               interpreter: bool) -> list[triton.Config]:
    """The configs among `configs` that `kernel` may time for operands of `element_size` bytes:
    under the interpreter its own small config; on a GPU the first MAX_CANDIDATES that fit."""
    mine = _INTERPRETER_CONFIGS[kernel]
    if interpreter:
        return [config for config in configs if config is mine]
    kept = [config for config in configs if config is not mine and fits(kernel, config, element_size)]
    return kept[:MAX_CANDIDATES]


def _prune(kernel: str, operand: str):
    """Early pruning for `kernel`, keyed on the element size of its argument `operand`."""
    def prune(configs, named_args, **kwargs):
        return candidates(kernel, configs, named_args[operand].element_size(),
                          autotuning.interpreting())
    return prune


# ----------------------------------------------------------------------------------------------
# tile helpers
# ----------------------------------------------------------------------------------------------

# Triton's CPU interpreter departs from compiled kernels' numerics in two places, which these
# helpers correct so that CPU tests measure the kernels' rounding and not the interpreter's:
# its tl.dot multiplies bf16 tiles as their raw uint16 bit patterns (so operands are widened
# first: exact, since bf16/fp16 products are exact in fp32 as on tensor cores), and its fp32→bf16
# casts truncate (so they are rounded to nearest even, as the hardware does). Compiled kernels
# never take these branches.
_INTERPRETED = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b with fp32 accumulation; fp32 operands in exact fp32 (no TF32)."""
    if _INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")  # "ieee" only affects fp32 operands


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 x rounded to dtype, to nearest even."""
    y = x.to(dtype)
    if _INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y


@triton.jit
def _load_tile(ptrs, rows, cols, n_rows, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Load a [R, C] tile at `ptrs`; rows [R], cols [C] are its indices. Masks (zero fill) only
    the axes that can run past the tensor's edge."""
    if EVEN_ROWS and EVEN_COLS:
        tile = tl.load(ptrs)
    elif EVEN_ROWS:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    elif EVEN_COLS:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, value, rows, cols, n_rows, n_cols, EVEN_ROWS: tl.constexpr,
                EVEN_COLS: tl.constexpr):
    """Store a [R, C] tile, masking only the axes that can run past the tensor's edge."""
    if EVEN_ROWS and EVEN_COLS:
        tl.store(ptrs, value)
    elif EVEN_ROWS:
        tl.store(ptrs, value, mask=cols[None, :] < n_cols)
    elif EVEN_COLS:
        tl.store(ptrs, value, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------

@autotuning.autotune(_CANDIDATES["scores"], key=["Lq", "Lk", "D", "BH"],
                     prune=_prune("scores", "q_ptr"))
@triton.jit
def _scores_kernel(
    q_ptr,       # (B, H, Lq, D), strides stride_q*: queries
    k_ptr,       # (B, H, Lk, D), strides stride_k*: keys
    p_ptr,       # (B·H, Lq_pad, Lk_pad) contiguous, out: P̃ = exp2(s − m_tile), input dtype
    m_ptr,       # (B·H, Lk_pad/BLOCK_N, Lq_pad) fp32 contiguous, out: row max of s in the tile
    l_ptr,       # (B·H, Lk_pad/BLOCK_N, Lq_pad) fp32 contiguous, out: row sum of P̃ in the tile
    H, Lq, Lk, D, BH, Lq_pad, Lk_pad,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    qk_scale,    # softmax scale · log2(e): s = (q·k) · qk_scale is in log2 units
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):
    """One BLOCK_M × BLOCK_N tile of scores, reduced over D; stores P̃ and its (m, l)."""
    pid_n = tl.program_id(0)  # key tiles vary fastest: concurrent programs share the Q rows
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (q_ptr + b * stride_qb + h * stride_qh
              + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd)         # [BM, BD]
    kt_ptrs = (k_ptr + b * stride_kb + h * stride_kh
               + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kl)        # [BD, BN] = Kᵀ

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        q = _load_tile(q_ptrs, offs_m, d0 + offs_d, Lq, D, EVEN_M, EVEN_D)
        kt = _load_tile(kt_ptrs, d0 + offs_d, offs_n, D, Lk, EVEN_D, EVEN_N)
        acc = _dot(q, kt, acc)
        q_ptrs += BLOCK_D * stride_qd
        kt_ptrs += BLOCK_D * stride_kd

    s = acc * qk_scale
    if not EVEN_N:  # keys past Lk must not enter the softmax
        s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
    tile_max = tl.max(s, axis=1)  # finite: every tile holds at least one real key
    p = tl.math.exp2(s - tile_max[:, None])
    tile_sum = tl.sum(p, axis=1)

    # Scratch is padded to whole tiles: no masks. Padded rows hold values that no stored result
    # uses (phase 2 may run a taller row tile over rows this kernel never wrote; it masks them).
    p_ptrs = p_ptr + pid_bh * Lq_pad * Lk_pad + offs_m[:, None] * Lk_pad + offs_n[None, :]
    tl.store(p_ptrs, _round(p, p_ptr.dtype.element_ty))
    stat = (pid_bh * (Lk_pad // BLOCK_N) + pid_n) * Lq_pad + offs_m
    tl.store(m_ptr + stat, tile_max)
    tl.store(l_ptr + stat, tile_sum)


@autotuning.autotune(_CANDIDATES["pv"], key=["Lq", "Lk", "D", "BH"], prune=_prune("pv", "v_ptr"))
@triton.jit
def _pv_kernel(
    p_ptr,       # (B·H, Lq_pad, Lk_pad) contiguous: P̃ from phase 1
    m_ptr,       # (B·H, Lk_pad/BLOCK_N, Lq_pad) fp32: per-tile row max (log2 units)
    l_ptr,       # (B·H, Lk_pad/BLOCK_N, Lq_pad) fp32: per-tile row sum of P̃
    v_ptr,       # (B, H, Lk, D), strides stride_v*: values
    o_ptr,       # (B, H, Lq, D), strides stride_o*, out: attention output, input dtype
    lse_ptr,     # (B·H, Lq) fp32 contiguous, out: logsumexp of the scaled scores (natural log)
    H, Lq, Lk, D, BH, Lq_pad, Lk_pad,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):
    """O[rows, d-tile] = Σ_j (P̃_j · exp2(m_j − lse2)) V_j[:, d-tile], j over key tiles."""
    pid_d = tl.program_id(0)  # d tiles vary fastest: concurrent programs share the P̃ rows
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    n_tiles = Lk_pad // BLOCK_N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)

    # Merge the rows' per-tile statistics into lse2 = log2 Σ exp2(s): a few bytes per tile.
    max_ptrs = m_ptr + pid_bh * n_tiles * Lq_pad + offs_m
    sum_ptrs = l_ptr + pid_bh * n_tiles * Lq_pad + offs_m
    m_row = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_row = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(0, n_tiles):
        m_j = tl.load(max_ptrs + j * Lq_pad)
        l_j = tl.load(sum_ptrs + j * Lq_pad)
        m_new = tl.maximum(m_row, m_j)
        l_row = l_row * tl.math.exp2(m_row - m_new) + l_j * tl.math.exp2(m_j - m_new)
        m_row = m_new
    lse2 = m_row + tl.math.log2(l_row)
    if pid_d == 0:
        lse_ptrs = lse_ptr + pid_bh * Lq + offs_m
        if EVEN_M:
            tl.store(lse_ptrs, lse2 * 0.6931471805599453)  # ln 2: back to natural-log units
        else:
            tl.store(lse_ptrs, lse2 * 0.6931471805599453, mask=offs_m < Lq)

    p_ptrs = p_ptr + pid_bh * Lq_pad * Lk_pad + offs_m[:, None] * Lk_pad + offs_n[None, :]
    v_ptrs = (v_ptr + b * stride_vb + h * stride_vh
              + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd)          # [BN, BD]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j in range(0, n_tiles):
        # Normalise P̃_j in fp32 (one factor per row) and round once to the operand dtype.
        weight = tl.math.exp2(tl.load(max_ptrs + j * Lq_pad) - lse2)
        p = tl.load(p_ptrs).to(tl.float32) * weight[:, None]
        v = _load_tile(v_ptrs, j * BLOCK_N + offs_n, offs_d, Lk, D, EVEN_N, EVEN_D)
        acc = _dot(_round(p, v.dtype), v, acc)
        p_ptrs += BLOCK_N
        v_ptrs += BLOCK_N * stride_vl

    o_ptrs = (o_ptr + b * stride_ob + h * stride_oh
              + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od)
    _store_tile(o_ptrs, _round(acc, o_ptr.dtype.element_ty), offs_m, offs_d, Lq, D, EVEN_M, EVEN_D)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------

@autotuning.autotune(_CANDIDATES["grad_scores"], key=["Lq", "Lk", "D", "BH"],
                     prune=_prune("grad_scores", "q_ptr"))
@triton.jit
def _grad_scores_kernel(
    q_ptr,       # (B, H, Lq, D), strides stride_q*
    k_ptr,       # (B, H, Lk, D), strides stride_k*
    v_ptr,       # (B, H, Lk, D), strides stride_v*
    o_ptr,       # (B, H, Lq, D), strides stride_o*: the forward output
    do_ptr,      # (B, H, Lq, D), strides stride_do*: gradient of the output
    lse_ptr,     # (B·H, Lq) fp32 contiguous: forward logsumexp (natural log)
    p_ptr,       # (B·H, Lq_pad, Lk_pad) contiguous, out: P, input dtype
    ds_ptr,      # (B·H, Lq_pad, Lk_pad) contiguous, out: dS · scale, input dtype
    H, Lq, Lk, D, BH, Lq_pad, Lk_pad,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    sm_scale,    # the softmax scale
    qk_scale,    # sm_scale · log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):
    """P = exp(S − lse) and dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)) · scale for one tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (q_ptr + b * stride_qb + h * stride_qh
              + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd)         # [BM, BD]
    o_ptrs = (o_ptr + b * stride_ob + h * stride_oh
              + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od)         # [BM, BD]
    do_ptrs = (do_ptr + b * stride_dob + h * stride_doh
               + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod)      # [BM, BD]
    kt_ptrs = (k_ptr + b * stride_kb + h * stride_kh
               + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kl)        # [BD, BN]
    vt_ptrs = (v_ptr + b * stride_vb + h * stride_vh
               + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vl)        # [BD, BN]

    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        q = _load_tile(q_ptrs, offs_m, d0 + offs_d, Lq, D, EVEN_M, EVEN_D)
        do = _load_tile(do_ptrs, offs_m, d0 + offs_d, Lq, D, EVEN_M, EVEN_D)
        o = _load_tile(o_ptrs, offs_m, d0 + offs_d, Lq, D, EVEN_M, EVEN_D)
        kt = _load_tile(kt_ptrs, d0 + offs_d, offs_n, D, Lk, EVEN_D, EVEN_N)
        vt = _load_tile(vt_ptrs, d0 + offs_d, offs_n, D, Lk, EVEN_D, EVEN_N)
        s = _dot(q, kt, s)
        dp = _dot(do, vt, dp)
        delta += tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        q_ptrs += BLOCK_D * stride_qd
        o_ptrs += BLOCK_D * stride_od
        do_ptrs += BLOCK_D * stride_dod
        kt_ptrs += BLOCK_D * stride_kd
        vt_ptrs += BLOCK_D * stride_vd

    lse_ptrs = lse_ptr + pid_bh * Lq + offs_m
    if EVEN_M:
        lse2 = tl.load(lse_ptrs) * 1.4426950408889634  # log2(e): into log2 units
    else:
        lse2 = tl.load(lse_ptrs, mask=offs_m < Lq, other=0.0) * 1.4426950408889634
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    ds = p * (dp - delta[:, None]) * sm_scale

    # Padded rows/columns of the scratch hold finite values that the GEMMs below never read.
    offs = pid_bh * Lq_pad * Lk_pad + offs_m[:, None] * Lk_pad + offs_n[None, :]
    tl.store(p_ptr + offs, _round(p, p_ptr.dtype.element_ty))
    tl.store(ds_ptr + offs, _round(ds, ds_ptr.dtype.element_ty))


@autotuning.autotune(_CANDIDATES["matmul"], key=["M", "N", "K", "BH", "stride_am", "stride_bn"],
                     prune=_prune("matmul", "a_ptr"))
@triton.jit
def _matmul_kernel(
    a_ptr,       # (B, H, M, K), strides stride_a*
    b_ptr,       # (B, H, K, N), strides stride_b*
    c_ptr,       # (B, H, M, N), strides stride_c*, out: A @ B in c's dtype (fp32 accumulation)
    H, M, N, K, BH,
    stride_ab, stride_ah, stride_am, stride_ak,
    stride_bb, stride_bh, stride_bk, stride_bn,
    stride_cb, stride_ch, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Batched strided GEMM, one BLOCK_M × BLOCK_N tile of C per program."""
    pid_n = tl.program_id(0)  # N (= d) tiles vary fastest: concurrent programs share A's rows
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = (a_ptr + b * stride_ab + h * stride_ah
              + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak)          # [BM, BK]
    b_ptrs = (b_ptr + b * stride_bb + h * stride_bh
              + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn)          # [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _load_tile(a_ptrs, offs_m, k0 + offs_k, M, K, EVEN_M, EVEN_K)
        bt = _load_tile(b_ptrs, k0 + offs_k, offs_n, K, N, EVEN_K, EVEN_N)
        acc = _dot(a, bt, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = (c_ptr + b * stride_cb + h * stride_ch
              + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn)
    _store_tile(c_ptrs, _round(acc, c_ptr.dtype.element_ty), offs_m, offs_n, M, N, EVEN_M, EVEN_N)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _outputs_only(x: torch.Tensor) -> bool:
    """Whether this call is the op's fake (meta) pass under the CPU interpreter. There wrap_triton
    returns the raw kernel, which cannot run on FakeTensors, so the launcher returns right after
    allocating its outputs: what a traced launch's fake implementation does on a GPU."""
    return _INTERPRET and isinstance(x, FakeTensor)


def empty_in_layout_of(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised (B, H, L, d) tensor shaped like x whose L/d memory order follows x's:
    L-fastest when x is stride 1 along L (the U-Net's qkv views), otherwise contiguous."""
    batch, heads, length, width = x.shape
    if x.stride(-2) == 1 and x.stride(-1) != 1 and length > 1:
        return x.new_empty((batch, heads, width, length), dtype=dtype).transpose(-1, -2)
    return x.new_empty((batch, heads, length, width), dtype=dtype)


def _row_tiles(q_len: int, meta: dict) -> int:
    """Row tiles of a kernel that writes score scratch, for the config that runs: its BLOCK_M
    must divide the scratch padding, or the last tile's unmasked stores would run past it."""
    if _ROW_ALIGN % meta["BLOCK_M"]:
        raise ValueError(f"BLOCK_M={meta['BLOCK_M']} does not divide the scratch row padding "
                         f"{_ROW_ALIGN}: add the config to the kernel's candidates")
    return triton.cdiv(q_len, meta["BLOCK_M"])


def _scratch_shape(q_len: int, k_len: int) -> tuple[int, int]:
    """(rows, cols) of the padded score scratch: whole tiles for every candidate config."""
    return triton.cdiv(q_len, _ROW_ALIGN) * _ROW_ALIGN, triton.cdiv(k_len, KEY_BLOCK) * KEY_BLOCK


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q kᵀ · scale) v, logsumexp of the scaled scores per row (B, H, Lq) fp32).

    q: (B, H, Lq, d); k, v: (B, H, Lk, d); one floating dtype, one device, any strides."""
    batch, heads, q_len, width = q.shape
    k_len = k.shape[2]
    out = empty_in_layout_of(q)
    lse = q.new_empty((batch, heads, q_len), dtype=torch.float32)
    if out.numel() == 0 or k_len == 0:  # nothing to launch; no keys: zero output, lse = −inf
        return out.zero_(), lse.fill_(float("-inf"))
    if _outputs_only(q):
        return out, lse
    bh = batch * heads
    rows, cols = _scratch_shape(q_len, k_len)
    n_tiles = cols // KEY_BLOCK
    p = q.new_empty((bh, rows, cols))
    tile_max = q.new_empty((bh, n_tiles, rows), dtype=torch.float32)
    tile_sum = torch.empty_like(tile_max)
    even_m = q_len % _ROW_ALIGN == 0
    even_n = k_len % KEY_BLOCK == 0

    wrap_triton(_scores_kernel)[lambda meta: (n_tiles, _row_tiles(q_len, meta), bh)](
        q, k, p, tile_max, tile_sum,
        heads, q_len, k_len, width, bh, rows, cols,
        *q.stride(), *k.stride(),
        scale * LOG2E,
        BLOCK_N=KEY_BLOCK, EVEN_M=even_m, EVEN_N=even_n,
        EVEN_D=_multiple(width, _CANDIDATES["scores"], "BLOCK_D"),
    )
    wrap_triton(_pv_kernel)[lambda meta: (triton.cdiv(width, meta["BLOCK_D"]),
                                          _row_tiles(q_len, meta), bh)](
        p, tile_max, tile_sum, v, out, lse,
        heads, q_len, k_len, width, bh, rows, cols,
        *v.stride(), *out.stride(),
        BLOCK_N=KEY_BLOCK, EVEN_M=even_m, EVEN_N=even_n,
        EVEN_D=_multiple(width, _CANDIDATES["pv"], "BLOCK_D"),
    )
    return out, lse


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
    """c[i, j] = a[i, j] @ b[i, j] for (B, H, M, K) a, (B, H, K, N) b, (B, H, M, N) c."""
    batch, heads, rows, inner = a.shape
    cols = b.shape[-1]
    wrap_triton(_matmul_kernel)[lambda meta: (triton.cdiv(cols, meta["BLOCK_N"]),
                                              triton.cdiv(rows, meta["BLOCK_M"]), batch * heads)](
        a, b, c,
        heads, rows, cols, inner, batch * heads,
        *a.stride(), *b.stride(), *c.stride(),
        EVEN_M=_multiple(rows, _CANDIDATES["matmul"], "BLOCK_M"),
        EVEN_N=_multiple(cols, _CANDIDATES["matmul"], "BLOCK_N"),
        EVEN_K=_multiple(inner, _CANDIDATES["matmul"], "BLOCK_K"),
    )


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention_forward, from its output and logsumexp; any strides."""
    batch, heads, q_len, width = q.shape
    k_len = k.shape[2]
    dq, dk, dv = empty_in_layout_of(q), empty_in_layout_of(k), empty_in_layout_of(v)
    if dq.numel() == 0 or dk.numel() == 0:  # an empty side: every gradient is zero (or empty)
        return dq.zero_(), dk.zero_(), dv.zero_()
    if _outputs_only(q):
        return dq, dk, dv
    bh = batch * heads
    rows, cols = _scratch_shape(q_len, k_len)
    p = q.new_empty((batch, heads, rows, cols))
    ds = torch.empty_like(p)

    wrap_triton(_grad_scores_kernel)[lambda meta: (cols // KEY_BLOCK,
                                                   _row_tiles(q_len, meta), bh)](
        q, k, v, out, grad_out, lse, p, ds,
        heads, q_len, k_len, width, bh, rows, cols,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
        scale, scale * LOG2E,
        BLOCK_N=KEY_BLOCK,
        EVEN_M=q_len % _ROW_ALIGN == 0,
        EVEN_N=k_len % KEY_BLOCK == 0,
        EVEN_D=_multiple(width, _CANDIDATES["grad_scores"], "BLOCK_D"),
    )
    p_t = p[:, :, :q_len, :k_len].transpose(-1, -2)    # (B, H, Lk, Lq) views, read in place
    ds_t = ds[:, :, :q_len, :k_len].transpose(-1, -2)
    _matmul(p_t, grad_out, dv)                          # dV = Pᵀ dO
    _matmul(ds_t, q, dk)                                # dK = dSᵀ Q  (scale is inside dS)
    _matmul(ds[:, :, :q_len, :k_len], k, dq)            # dQ = dS K
    return dq, dk, dv


__all__ = ["attention_forward", "attention_backward", "empty_in_layout_of"]
