"""attention: every fast backend against sr3fast.reference.attention, forward and backward, and
the Triton op's registration (opcheck, torch.compile, layouts).

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are
small. The interpreter's default tiles are 32 query rows × 64 keys (KEY_BLOCK), with d (and the
backward GEMMs' inner axis) in chunks of 32; the named cases below are chosen to cross tile edges
(35 = 32 + 3, 150 = 2·64 + 22), fill tiles exactly (64), or fit inside one (1, 16). Every GPU
config of every kernel is also forced once at small shapes (the autotuner only ever runs its
pick, so nothing else would run them before a GPU does).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sr3fast
from sr3fast import backends, ops, reference
from support import DEVICE, assert_within_baseline, fast_backend_params, fp32_atol, report

TRITON_UNAVAILABLE = backends.unavailable_reason("triton", DEVICE.type)
needs_triton = pytest.mark.skipif(TRITON_UNAVAILABLE is not None, reason=str(TRITON_UNAVAILABLE))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# name: (batch, heads, q_len, k_len, width, layout, scale)
CASES = {
    "1x1_spatial_batch3": (3, 1, 1, 1, 32, "unet", None),
    "odd_7x5_d48": (1, 1, 35, 35, 48, "unet", None),
    "Lq_ne_Lk_heads2": (1, 2, 20, 45, 32, "contiguous", None),
    "d96_Lq_gt_Lk_transposed": (1, 1, 40, 24, 96, "transposed", 0.3),
    "d256_4x4": (1, 1, 16, 16, 256, "unet", None),
    "heads2_batch3": (3, 2, 9, 9, 32, "contiguous", 0.5),
    "whole_tiles_8x8_d64": (2, 1, 64, 64, 64, "unet", None),
    # |scores| up to ~50: row maxima differ widely between key tiles, most weights underflow
    "peaked_softmax_3_key_tiles": (1, 1, 150, 150, 48, "unet", 2.0),
}
LAYOUTS = ("unet", "contiguous", "transposed")


def make_qkv(batch, heads, q_len, k_len, width, layout, dtype=torch.float32, seed=0,
             requires_grad=False):
    """q (B, heads, Lq, d) and k, v (B, heads, Lk, d), in one of three memory layouts:

    unet        views of one (B, 3·d, L) tensor, exactly as the U-Net passes its qkv conv output:
                stride 1 along L, L along d (needs heads = 1, Lq = Lk)
    contiguous  (B, heads, L, d) contiguous
    transposed  stored as (B, heads, d, L): stride 1 along L, but not views of one tensor
    With requires_grad, the stored tensors are autograd leaves and q, k, v views of them.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        stored = torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)
        return stored.requires_grad_(requires_grad)

    if layout == "unet":
        assert heads == 1 and q_len == k_len, "the U-Net layout is single-head self-attention"
        qkv = randn(batch, 3 * width, q_len)
        return tuple(qkv.transpose(1, 2).unsqueeze(1).split(width, dim=-1))
    if layout == "contiguous":
        return randn(batch, heads, q_len, width), randn(batch, heads, k_len, width), \
            randn(batch, heads, k_len, width)
    if layout == "transposed":
        return tuple(randn(batch, heads, width, n).transpose(-1, -2) for n in (q_len, k_len, k_len))
    raise ValueError(layout)


def leaves(*tensors, dtype=None):
    """Leaf copies (cast to dtype if given) that require grad."""
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def forward_backward(fn, q, k, v, scale, grad_out):
    """(out, dq, dk, dv) of fn; q, k, v require grad (leaves, or views of leaves)."""
    out = fn(q, k, v, scale)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    return (out.detach(), *grads)


def plain_torch(q, k, v, scale):
    """Plain PyTorch attention in the inputs' own dtype: the baseline of DESIGN.md's bf16 rule."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def fast_attention(backend):
    def run(q, k, v, scale):
        with sr3fast.backend(backend):
            return ops.attention(q, k, v, scale)
    return run


def rounding_floors(q, k, v, grad_out, scale):
    """fp32_atol for (out, dq, dk, dv): the rounding error of computing them in fp32, used as
    the atol of DESIGN.md's rule, for results that the baseline happens to get exactly (at L = 1
    the softmax is 1 and dq = 0 in any precision, but a fused kernel's fp32 rounding is not 0).

    Each result chains reductions, scores over d then a sum over keys (out, dq) or queries
    (dk, dv); the random-walk bound takes their total length and the size of the terms summed:
      out = Σ_j P v           terms ≤ max|v|                     (P ≤ 1)
      dv  = Σ_i P dO          terms ≤ max|dO|
      dq  = Σ_j dS k · scale  terms ≤ max|dO Vᵀ| · max|k| · scale  (dS = P (dP − rowsum(dO⊙O)))
      dk  = Σ_i dS q · scale  terms ≤ max|dO Vᵀ| · max|q| · scale
    """
    width, q_len, k_len = q.shape[-1], q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(width) if scale is None else scale
    q64, k64, v64, g64 = (t.detach().double() for t in (q, k, v, grad_out))
    q_max, k_max, v_max, g_max, dp_max = (
        t.abs().max().item() if t.numel() else 0.0
        for t in (q64, k64, v64, g64, g64 @ v64.transpose(-1, -2)))
    return (fp32_atol(width + k_len, v_max),
            fp32_atol(width + k_len, dp_max * k_max * scale),
            fp32_atol(width + q_len, dp_max * q_max * scale),
            fp32_atol(width + q_len, g_max))


def check_against_reference(attention, q, k, v, scale, name):
    """Forward and backward of `attention(q, k, v, scale)` with DESIGN.md's rule, err(fast) <= 2 err(baseline) +
    atol, atol = the fp32 rounding floor above:
      fp32        error from the exact (fp64) result, baseline = the fp32 reference itself: the
                  fused kernels must be as accurate as sr3fast.reference in the same precision
      bf16, fp16  error from the fp32 reference, baseline = plain PyTorch in that dtype
    """
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fast = forward_backward(attention, q, k, v, scale, grad_out)
    # the reference's fp32 maths on the same (exactly representable) input values
    expected = forward_backward(reference.attention, *leaves(q, k, v, dtype=torch.float32),
                                scale, grad_out)
    floors = rounding_floors(q, k, v, grad_out, scale)
    names = ("out", "dq", "dk", "dv")
    for value, part in zip(fast, names):
        assert value.dtype == q.dtype, f"{name} {part}: dtype {value.dtype} != {q.dtype}"
    if q.dtype == torch.float32:
        exact = forward_backward(plain_torch, *leaves(q, k, v, dtype=torch.float64), scale,
                                 grad_out)
        for value, truth, ref, part, atol in zip(fast, exact, expected, names, floors):
            report(f"{name} {part} fast vs fp32 reference", value, ref)
            assert_within_baseline(f"{name} {part}", value, truth, ref, atol)
    else:
        baseline = forward_backward(plain_torch, *leaves(q, k, v), scale, grad_out)
        for value, ref, base, part, atol in zip(fast, expected, baseline, names, floors):
            assert_within_baseline(f"{name} {part}", value, ref, base, atol)


@pytest.mark.parametrize("backend", fast_backend_params("attention"))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_backward(backend, case, dtype):
    batch, heads, q_len, k_len, width, layout, scale = CASES[case]
    q, k, v = make_qkv(batch, heads, q_len, k_len, width, layout, dtype, requires_grad=True)
    check_against_reference(fast_attention(backend), q, k, v, scale, case)


@pytest.mark.parametrize("backend", fast_backend_params("attention"))
@pytest.mark.parametrize("case", ["odd_7x5_d48", "Lq_ne_Lk_heads2", "whole_tiles_8x8_d64"])
def test_fp16_forward_backward(backend, case):
    batch, heads, q_len, k_len, width, layout, scale = CASES[case]
    q, k, v = make_qkv(batch, heads, q_len, k_len, width, layout, torch.float16,
                       requires_grad=True)
    check_against_reference(fast_attention(backend), q, k, v, scale, case)


@pytest.mark.parametrize("backend", fast_backend_params("attention"))
def test_scale_none_is_inverse_sqrt_width(backend):
    q, k, v = make_qkv(1, 1, 35, 35, 48, "unet")
    run = fast_attention(backend)
    default, explicit = run(q, k, v, None), run(q, k, v, 1.0 / math.sqrt(48))
    sharper = run(q, k, v, 0.5)
    report("scale None vs 1/sqrt(d)", default, explicit)
    assert torch.equal(default, explicit)
    assert (sharper - default).abs().max() > 1e-2  # a given scale is really used


@pytest.mark.parametrize("backend", fast_backend_params("attention"))
@settings(max_examples=6, deadline=None, derandomize=True)
@given(batch=st.integers(1, 2), heads=st.integers(1, 2), q_len=st.integers(1, 48),
       k_len=st.integers(1, 80), width=st.integers(1, 72), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       scale=st.one_of(st.none(), st.floats(0.05, 1.0)))
def test_random_shapes(backend, batch, heads, q_len, k_len, width, layout, dtype, scale):
    if layout == "unet" and (heads != 1 or q_len != k_len):
        layout = "transposed"
    q, k, v = make_qkv(batch, heads, q_len, k_len, width, layout, dtype, requires_grad=True)
    name = f"B{batch} h{heads} Lq{q_len} Lk{k_len} d{width} {layout} {dtype} scale={scale}"
    check_against_reference(fast_attention(backend), q, k, v, scale, name)


# ---- the Triton op itself ---------------------------------------------------------------------

@needs_triton
def test_logsumexp_output():
    from sr3fast.ops.triton.attention import attention_with_lse
    q, k, v = make_qkv(1, 2, 20, 45, 32, "contiguous")
    out, lse = attention_with_lse(q, k, v, 0.3)
    expected = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * 0.3, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 20)
    max_err, _ = report("lse", lse, expected)
    # lse = max s + log Σ exp(s − max s): scores' rounding (terms |q_d k_d| scale) and log's
    q_max, k_max = q.abs().max().item(), k.abs().max().item()
    atol = fp32_atol(32 + 45, q_max * k_max * 0.3 + expected.abs().max().item())
    assert max_err <= atol, f"lse: max error {max_err:.3e} > {atol:.3e}"


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_follow_input_layout(layout):
    """Outputs and gradients take their input's (L, d) memory order, so the U-Net's reshape of
    the output back to (B, C, H, W) is a view whatever memory format the model runs in."""
    from sr3fast.ops.triton.attention import attention
    q, k, v = make_qkv(2, 1, 6, 6, 16, layout, requires_grad=True)
    out = attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    l_fastest = layout != "contiguous"
    for name, tensor in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert (tensor.stride(-2) == 1) == l_fastest, f"{name}: strides {tensor.stride()}"
    if l_fastest:
        out.squeeze(1).transpose(1, 2).view(2, 16, 3, 2)  # raises if this were not a view


@needs_triton
def test_strided_views_are_read_in_place():
    """The launchers allocate outputs and scratch and copy nothing (no .contiguous()): traced
    with fake tensors from the U-Net's qkv tensor, their graph holds views, allocations and
    kernel launches only (under the CPU interpreter, launches are skipped on fakes)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from sr3fast.kernels.attention import attention_backward, attention_forward

    def unet_attention_forward_backward(qkv, grad_out):
        q, k, v = qkv.transpose(1, 2).unsqueeze(1).split(48, dim=-1)
        out, lse = attention_forward(q, k, v, 0.2)
        return attention_backward(grad_out, q, k, v, out, lse, 0.2)

    qkv = torch.randn(2, 3 * 48, 35, device=DEVICE)
    grad_out = torch.randn(2, 1, 35, 48, device=DEVICE)
    graph = make_fx(unet_attention_forward_backward, tracing_mode="fake")(qkv, grad_out)
    calls = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    print("traced calls:", sorted(set(calls)))
    copies = [name for name in calls if "copy" in name or "clone" in name or "contiguous" in name]
    assert not copies, f"the launchers copied tensors: {copies}"
    assert any("empty" in name for name in calls)  # the trace did see the launchers' work


@needs_triton
def test_rejects_unsupported_dtypes():
    from sr3fast.ops.triton.attention import attention
    q = torch.randn(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        attention(q.double(), q.double(), q.double())
    with pytest.raises(TypeError, match="one dtype"):
        attention(q, q.bfloat16(), q)


@needs_triton
@pytest.mark.parametrize("shape", [(2, 1, 5, 0, 8), (0, 1, 5, 5, 8), (1, 1, 0, 5, 8)],
                         ids=["no_keys", "no_batch", "no_queries"])
def test_empty_inputs_match_reference(shape):
    from sr3fast.ops.triton.attention import attention
    batch, heads, q_len, k_len, width = shape
    q = torch.randn(batch, heads, q_len, width, device=DEVICE, requires_grad=True)
    k = torch.randn(batch, heads, k_len, width, device=DEVICE, requires_grad=True)
    out = attention(q, k, k)
    expected = reference.attention(q, k, k)
    assert out.shape == expected.shape and torch.equal(out, expected)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# opcheck's checks that run under the CPU interpreter. test_aot_dispatch_dynamic decomposes the
# triton_op into its kernel launches on functional tensors, which needs wrap_triton's traceable
# kernels; under TRITON_INTERPRET wrap_triton returns the raw kernel, so it runs on CUDA only.
OPCHECK_CPU_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
OPCHECK_CUDA_UTILS = ("test_aot_dispatch_dynamic",)


def opcheck_forward(utils):
    from sr3fast.ops.triton.attention import attention_with_lse
    for dtype in (torch.float32, torch.bfloat16):
        for layout, shape in (("unet", (1, 1, 35, 35, 48)), ("contiguous", (2, 2, 20, 33, 32))):
            q, k, v = make_qkv(*shape, layout, dtype, requires_grad=True)
            torch.library.opcheck(attention_with_lse, (q, k, v, 0.25), test_utils=utils)


def opcheck_backward(utils):
    from sr3fast.ops.triton.attention import attention_grad, attention_with_lse
    q, k, v = make_qkv(1, 1, 35, 35, 48, "unet")
    out, lse = attention_with_lse(q, k, v, 0.25)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(attention_grad, (grad_out, q, k, v, out, lse, 0.25), test_utils=utils)


@needs_triton
def test_opcheck():
    opcheck_forward(OPCHECK_CPU_UTILS)
    opcheck_backward(OPCHECK_CPU_UTILS)


@needs_cuda
@needs_triton
def test_opcheck_aot_dispatch():
    opcheck_forward(OPCHECK_CUDA_UTILS)
    opcheck_backward(OPCHECK_CUDA_UTILS)


# ---- the Triton kernels' configs: budgets, and every config run once ------------------------------
# The autotuner only ever runs its pick, so a GPU config nobody forces would first run on a GPU,
# at whatever shape picked it. These tests force each one under the interpreter (or on the GPU).

ATTENTION_KERNELS = ("scores", "pv", "grad_scores", "matmul")
MAX_CANDIDATES = 4  # what autotuning may compile and time per kernel, dtype and shape
# One program's budgets on an H100/H200: 227 KiB of shared memory per block, and registers per
# thread: 16-bit operands (tensor cores) hold only the fp32 accumulators, at most 128 (half the
# 255-register file); fp32 operands (FMA dots) hold the operand tiles beside them, at most 160
# (the H200 spilled hundreds of registers beyond that; see kernels/attention.py).
SHARED_MEMORY_BYTES = 227 * 1024
SR3_SHAPES = {"16x16_d512": (4, 256, 512), "32x32_d1024": (1, 1024, 1024)}


def attention_kernels():
    from sr3fast.kernels import attention as kernels
    return kernels


def autotuned(kernels, name):
    return {"scores": kernels._scores_kernel, "pv": kernels._pv_kernel,
            "grad_scores": kernels._grad_scores_kernel, "matmul": kernels._matmul_kernel}[name]


def program_tiles(name, blocks, key_block):
    """(fp32 accumulator tiles, operand tiles loaded per loop step) of one program, read off each
    kernel's loop; written out here independently of the kernels' own budget code."""
    rows = blocks["BLOCK_M"]
    if name == "scores":       # S = Q Kᵀ over d chunks
        d = blocks["BLOCK_D"]
        return [(rows, key_block)], [(rows, d), (d, key_block)]
    if name == "pv":           # O = P̃ V over key tiles
        d = blocks["BLOCK_D"]
        return [(rows, d)], [(rows, key_block), (key_block, d)]
    if name == "grad_scores":  # S and dP over d chunks of Q, dO, O, Kᵀ, Vᵀ
        d = blocks["BLOCK_D"]
        return [(rows, key_block)] * 2, [(rows, d)] * 3 + [(d, key_block)] * 2
    cols, inner = blocks["BLOCK_N"], blocks["BLOCK_K"]
    return [(rows, cols)], [(rows, inner), (inner, cols)]


def within_budgets(name, config, element_size, key_block):
    accumulators, operands = program_tiles(name, config.kwargs, key_block)
    accumulator = sum(m * n for m, n in accumulators)
    operand = sum(m * n for m, n in operands)
    threads = 32 * config.num_warps
    shared = config.num_stages * operand * element_size  # one copy per pipeline stage
    if element_size == 4:
        registers_fit = (accumulator + operand) / threads <= 160
    else:
        registers_fit = accumulator / threads <= 128
    return registers_fit and shared <= SHARED_MEMORY_BYTES


def launch_arguments(kernel, dtype, batch, length, width):
    """Named arguments as the launchers pass them at an SR3 shape (meta tensors: nothing runs)."""
    fp32_scratch = ("m_ptr", "l_ptr", "lse_ptr")  # softmax statistics: fp32 whatever the inputs
    sizes = {"H": 1, "BH": batch, "Lq": length, "Lk": length, "D": width, "M": length,
             "N": width, "K": length, "Lq_pad": length, "Lk_pad": length}
    args = {}
    for arg in kernel.arg_names:
        if arg.endswith("_ptr"):
            args[arg] = torch.empty(0, device="meta",
                                    dtype=torch.float32 if arg in fp32_scratch else dtype)
        else:
            args[arg] = sizes.get(arg, 1)
    return args


@needs_triton
@pytest.mark.parametrize("shape", list(SR3_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ATTENTION_KERNELS)
def test_gpu_candidates_fit_budgets(name, dtype, shape, monkeypatch):
    """On a GPU, each kernel's early pruning (as wired into its autotuner, reading the element
    size of the right argument) keeps, in list order, the first MAX_CANDIDATES GPU configs
    within the register and shared-memory budgets: at least one at each SR3 shape and dtype."""
    kernels = attention_kernels()
    kernel = autotuned(kernels, name)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # prune as on a GPU, unpinned
    monkeypatch.delenv("SR3FAST_TRITON_AUTOTUNE", raising=False)
    element_size = torch.finfo(dtype).bits // 8
    kept = kernel.early_config_prune(kernel.configs, launch_arguments(kernel, dtype,
                                                                      *SR3_SHAPES[shape]))
    print(name, dtype, [str(config) for config in kept])
    fitting = [config for config in kernels.GPU_CONFIGS[name]
               if within_budgets(name, config, element_size, kernels.KEY_BLOCK)]
    assert 1 <= len(kept) <= MAX_CANDIDATES
    assert kept == fitting[:MAX_CANDIDATES]


@needs_triton
def test_every_gpu_config_runs_in_some_dtype():
    """A listed config that the budgets and the candidate cap exclude in every dtype never runs."""
    kernels = attention_kernels()
    for name in ATTENTION_KERNELS:
        reachable = [config for size in (2, 4) for config in
                     kernels.candidates(name, kernels._CANDIDATES[name], size, interpreter=False)]
        dead = [str(config) for config in kernels.GPU_CONFIGS[name] if config not in reachable]
        assert not dead, f"{name}: configs that never run: {dead}"


def triton_config(**blocks):
    import triton
    return triton.Config(blocks, num_warps=4, num_stages=1)


@needs_triton
def test_scratch_padding_covers_every_row_block():
    """Score scratch is padded to whole row tiles of every config that can run; a forced config
    with a larger row block is refused before it launches, instead of writing past the scratch."""
    from sr3fast.kernels.autotuning import forced
    kernels = attention_kernels()
    for name in ("scores", "pv", "grad_scores"):
        for config in kernels._CANDIDATES[name]:
            assert kernels._ROW_ALIGN % config.kwargs["BLOCK_M"] == 0, (name, str(config))
    too_tall = triton_config(BLOCK_M=2 * kernels._ROW_ALIGN, BLOCK_D=32)
    q, k, v = make_qkv(1, 1, 40, 40, 32, "contiguous", torch.bfloat16)
    with forced(kernels._scores_kernel, too_tall), pytest.raises(ValueError, match="BLOCK_M"):
        kernels.attention_forward(q, k, v, 0.2)


@needs_triton
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter's default configs")
def test_interpreter_runs_its_small_configs():
    """Under the interpreter an unforced call runs each kernel's small interpreter config (the
    GPU configs stay in the candidate lists, for tests that force them)."""
    from sr3fast.ops.triton.attention import attention
    kernels = attention_kernels()
    q, k, v = make_qkv(1, 1, 35, 35, 48, "unet", requires_grad=True)
    out = attention(q, k, v)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for name in ATTENTION_KERNELS:
        assert autotuned(kernels, name).best_config is kernels._INTERPRETER_CONFIGS[name], name


# name: (batch, heads, q_len, k_len, width, layout), as small as the interpreter's time asks.
# "even": every length a multiple of every block of every config (no masks anywhere, as at SR3's
# shapes); "ragged": partial last tiles on every axis (2 row tiles of 128, 3 key tiles), Lq != Lk.
FORCED_SHAPES = {
    "even": (1, 1, 128, 128, 256, "unet"),
    "ragged": (1, 1, 150, 130, 200, "transposed"),
}


@needs_triton
@pytest.mark.parametrize("shape", list(FORCED_SHAPES))
@pytest.mark.parametrize("run", range(MAX_CANDIDATES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_gpu_config_forced(dtype, run, shape):
    """Run `run` forces config number `run` (cyclically) of each kernel's GPU candidates for this
    dtype, so MAX_CANDIDATES runs run every config that can run in it; forward and backward
    against the reference with the usual derived tolerances."""
    from contextlib import ExitStack

    from sr3fast.kernels.autotuning import forced
    from sr3fast.ops.triton.attention import attention
    kernels = attention_kernels()
    batch, heads, q_len, k_len, width, layout = FORCED_SHAPES[shape]
    element_size = torch.finfo(dtype).bits // 8
    chosen = {}
    for name in ATTENTION_KERNELS:
        configs = kernels.candidates(name, kernels._CANDIDATES[name], element_size,
                                     interpreter=False)
        assert len(configs) <= MAX_CANDIDATES  # so `run` in range(MAX_CANDIDATES) reaches all
        chosen[name] = configs[run % len(configs)]
    label = f"{shape} " + " ".join(f"{name}[{config}]" for name, config in chosen.items())
    q, k, v = make_qkv(batch, heads, q_len, k_len, width, layout, dtype, requires_grad=True)
    with ExitStack() as stack:
        for name, config in chosen.items():
            stack.enter_context(forced(autotuned(kernels, name), config))
        check_against_reference(attention, q, k, v, None, label)
        for name, config in chosen.items():  # the forced configs are what ran
            assert autotuned(kernels, name).best_config is config, name


# name: (q_len, k_len, width, layout); widths and lengths relative to the largest blocks of all
# candidate configs (even) or not (ragged), so each case takes the masked or unmasked loads.
MULTI_TILE = {
    "even_L_even_d": (128, 256, 256, "transposed"),
    "even_L_ragged_d": (128, 192, 72, "transposed"),
    "ragged_L_even_d": (100, 130, 256, "transposed"),
    "ragged_L_ragged_d": (100, 150, 72, "transposed"),
}


@needs_triton
@pytest.mark.parametrize("case", list(MULTI_TILE))
def test_multi_tile_fp32(case):
    """fp32 with the configs that run by default: several row tiles, several key tiles (so the
    per-tile softmax statistics are merged) and several d chunks, against the reference within
    the fp32 rounding floor (check_against_reference)."""
    from sr3fast.ops.triton.attention import attention
    kernels = attention_kernels()
    q_len, k_len, width, layout = MULTI_TILE[case]
    even_l, even_d = case.startswith("even_L"), "even_d" in case
    assert even_l == (q_len % kernels._ROW_ALIGN == 0 and k_len % kernels.KEY_BLOCK == 0)
    assert even_d == all(kernels._multiple(width, kernels._CANDIDATES[name], "BLOCK_D")
                         for name in ("scores", "pv", "grad_scores"))
    q, k, v = make_qkv(1, 1, q_len, k_len, width, layout, requires_grad=True)
    check_against_reference(attention, q, k, v, None, case)
    scores, grad_scores = kernels._scores_kernel.best_config, kernels._grad_scores_kernel.best_config
    for config in (scores, grad_scores):  # what ran really was several tiles on each axis
        assert math.ceil(q_len / config.kwargs["BLOCK_M"]) >= 2, str(config)
        assert math.ceil(width / config.kwargs["BLOCK_D"]) >= 2, str(config)
    assert math.ceil(k_len / kernels.KEY_BLOCK) >= 3


# ---- independent checks of the oracle -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 35, 35, 48), (2, 2, 20, 45, 32), (3, 1, 1, 1, 16)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_reference_matches_sdpa_fp64(shape, scale):
    """sr3fast.reference.attention (fp32 maths) against F.scaled_dot_product_attention in fp64,
    an independent formulation, within the fp32 rounding floor."""
    q, k, v = (t.cpu() for t in make_qkv(*shape, "contiguous", torch.float64))
    expected = F.scaled_dot_product_attention(q, k, v, scale=scale)
    actual = reference.attention(q.float(), k.float(), v.float(), scale)
    max_err, _ = report("reference vs sdpa fp64", actual, expected)
    atol = rounding_floors(q, k, v, torch.ones_like(q), scale)[0]
    assert actual.dtype == torch.float32
    assert max_err <= atol, f"max error {max_err:.3e} > {atol:.3e}"


def test_reference_gradients():
    """The reference's gradients (autograd through its fp32 maths) against softmax(q kᵀ s) v
    written out independently in fp64, whose own gradients gradcheck verifies."""
    q, k, v = (t.cpu() for t in make_qkv(1, 2, 5, 7, 6, "contiguous", torch.float64,
                                         requires_grad=True))

    def independent(q, k, v):
        weights = torch.exp(torch.einsum("bhid,bhjd->bhij", q, k) * 0.4)
        return torch.einsum("bhij,bhjd->bhid", weights / weights.sum(-1, keepdim=True), v)

    assert torch.autograd.gradcheck(independent, (q, k, v))
    grad_out = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = forward_backward(lambda q, k, v, _: independent(q, k, v), q, k, v, 0.4, grad_out)
    actual = forward_backward(reference.attention, *leaves(q, k, v, dtype=torch.float32), 0.4,
                              grad_out)
    for a, e, name, atol in zip(actual, expected, ("out", "dq", "dk", "dv"),
                                rounding_floors(q, k, v, grad_out, 0.4)):
        max_err, _ = report(f"reference {name} vs fp64", a, e)
        assert max_err <= atol, f"{name}: max error {max_err:.3e} > {atol:.3e}"


# ---- CUDA only: compile, graphs, SR3's real shapes -------------------------------------------------

@needs_cuda
@needs_triton
@pytest.mark.parametrize("entry", ["triton_op", "dispatcher"])
def test_compile_fullgraph_forward_backward(entry):
    """torch.compile(fullgraph=True) traces through the triton_op to its kernels, forward and
    backward, directly and through the dispatcher the model calls. The compiled graph may pick
    other autotuned tiles (another summation order), so it is held to the same rule as eager."""
    from sr3fast.ops.triton.attention import attention
    compiled = torch.compile(attention if entry == "triton_op" else ops.attention, fullgraph=True)
    q, k, v = make_qkv(2, 1, 64, 64, 96, "unet", torch.bfloat16, requires_grad=True)
    with sr3fast.backend("triton"):  # selected outside the graph, which guards on it
        check_against_reference(compiled, q, k, v, None, f"compiled {entry}")


@needs_cuda
@needs_triton
def test_cuda_graph_replay():
    from sr3fast.ops.triton.attention import attention
    q, k, v = make_qkv(2, 1, 256, 256, 512, "unet", torch.bfloat16)
    expected = attention(q, k, v)  # the first call autotunes: outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, k, v)
    q.mul_(0.5)  # the replay must read the new values in place
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(out, expected)
    assert torch.equal(out, attention(q, k, v))


@needs_cuda
@pytest.mark.parametrize("backend", fast_backend_params("attention"))
@pytest.mark.parametrize("shape", [(4, 256, 512), (1, 1024, 1024)],
                         ids=["16x16_d512", "32x32_d1024"])
@pytest.mark.parametrize("layout", ["unet", "contiguous"])
def test_sr3_shapes_bf16(backend, shape, layout):
    batch, length, width = shape
    q, k, v = make_qkv(batch, 1, length, length, width, layout, torch.bfloat16, requires_grad=True)
    check_against_reference(fast_attention(backend), q, k, v, None, f"SR3 {shape} {layout}")


# ---- the cpu backend: torch's fused CPU attention, memory O(L·d) --------------------------------

needs_cpu_backend = pytest.mark.skipif(backends.unavailable_reason("cpu", "cpu") is not None,
                                       reason=str(backends.unavailable_reason("cpu", "cpu")))


@needs_cpu_backend
def test_auto_runs_attention_on_the_cpu_backend():
    with sr3fast.backend("auto"):
        assert backends.resolve("attention", "cpu") == "cpu"


@needs_cpu_backend
@pytest.mark.skipif(DEVICE.type != "cpu", reason="measures CPU memory")
def test_cpu_attention_never_stores_the_scores():
    """At L = 64² (a 64x64 feature map) the L×L fp32 scores take 64 MiB; the reference stores
    them (and its softmax), the cpu backend must stay below a quarter of one such matrix while
    returning the reference's values (U-Net layout: views of one qkv tensor, L-fastest, which
    torch's fused kernel does not take as they are). Measured as the process's peak memory."""
    from sr3fast.tiling import PeakMemory, cpu_peak_supported
    if not cpu_peak_supported():
        pytest.skip("measuring peak memory needs Linux /proc")
    length, width = 64 * 64, 64
    q, k, v = (t.cpu() for t in make_qkv(1, 1, length, length, width, "unet"))
    scores = length * length * 4
    with sr3fast.backend("cpu"), PeakMemory("cpu") as fast:
        out = ops.attention(q, k, v)
    with PeakMemory("cpu") as oracle:
        expected = reference.attention(q, k, v)
    print(f"peak: cpu backend {fast.bytes / 2**20:.1f} MiB, reference {oracle.bytes / 2**20:.1f} MiB, "
          f"L×L fp32 {scores / 2**20:.0f} MiB")
    assert oracle.bytes >= scores            # the measurement sees an L×L matrix when there is one
    assert fast.bytes < scores / 4
    max_err, _ = report("cpu attention at L=4096 vs reference", out, expected)
    v_max = v.abs().max().item()
    # both in fp32, each within the random-walk floor of the exact result: twice the floor
    assert max_err <= 2 * fp32_atol(width + length, v_max)


@needs_cpu_backend
def test_cpu_attention_refuses_integer_inputs():
    from sr3fast.ops.extension.attention import attention
    q = torch.ones(1, 1, 4, 8, dtype=torch.int32)
    with pytest.raises(TypeError, match="floating dtype"):
        attention(q, q, q)
