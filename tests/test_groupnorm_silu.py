"""groupnorm_silu: every fast backend against sr3fast.reference, forward and backward (fp32 with
derived tolerances, bf16 and fp16 with DESIGN.md's three-way rule), on the edge cases DESIGN.md
names; the Triton op's three strategies (one tile, loop, split) forced onto small shapes; its
registration (opcheck), determinism and plans; and the reference against float64 PyTorch.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py): shapes are
small, and the split/loop paths are reached by lowering `kernels.groupnorm_silu.TUNING`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sr3fast
from sr3fast import backends, ops, reference
from sr3fast.kernels import autotuning
from sr3fast.kernels import groupnorm_silu as gn_kernels
from support import DEVICE, assert_within_baseline, fast_backend_params, fp32_atol, report

TRITON_UNAVAILABLE = backends.unavailable_reason("triton", DEVICE.type)
needs_triton = pytest.mark.skipif(TRITON_UNAVAILABLE is not None, reason=str(TRITON_UNAVAILABLE))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple
    groups: int
    channels_last: bool = False
    shift: bool = True
    affine: str = "both"  # which of weight/bias exist: both | weight | bias | none
    act: bool = True


CASES = {
    "1x1_spatial": Case((3, 8, 1, 1), 4),
    "odd_7x5": Case((2, 6, 7, 5), 3),
    "groups_eq_C": Case((2, 8, 3, 3), 8),
    "C3_G1": Case((2, 3, 5, 5), 1),
    "C3_G3_no_shift": Case((2, 3, 4, 4), 3, shift=False),
    "C96_G32_cpg3_nhwc": Case((1, 96, 3, 3), 32, channels_last=True),
    "nhwc_odd_5x3": Case((2, 12, 5, 3), 4, channels_last=True),
    "nhwc_groups_eq_C": Case((2, 8, 2, 3), 8, channels_last=True),
    "batch1": Case((1, 8, 8, 8), 2),
    "batch16_2x2": Case((16, 8, 2, 2), 4),
    "act_false": Case((2, 8, 4, 4), 2, act=False),
    "no_affine": Case((2, 8, 4, 4), 4, affine="none"),
    "weight_only_nhwc": Case((2, 8, 4, 4), 2, channels_last=True, affine="weight"),
    "bias_only_no_shift_no_act": Case((2, 8, 3, 3), 2, shift=False, affine="bias", act=False),
    "1d_spatial": Case((2, 8, 10), 2),
    "3d_spatial_nhwc": Case((1, 8, 3, 4, 2), 4, channels_last=True),
}


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """t with channels-last strides, for any number of spatial dims."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def make_inputs(case: Case, dtype=torch.float32, seed=0):
    """x (B, C, *spatial) with a non-zero mean, and the optional weight, bias, shift."""
    gen = torch.Generator().manual_seed(seed)
    batch, chans = case.shape[:2]

    def randn(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen) * scale + offset).to(DEVICE, dtype)

    x = randn(*case.shape, scale=2.0, offset=1.0)
    if case.channels_last:
        x = channels_last(x)
    weight = randn(chans, scale=0.5, offset=1.0) if case.affine in ("both", "weight") else None
    bias = randn(chans, scale=0.5) if case.affine in ("both", "bias") else None
    shift = randn(batch, chans) if case.shift else None
    return x, weight, bias, shift


def grad_output(case: Case, dtype=torch.float32, seed=1) -> torch.Tensor:
    """dL/dy: always contiguous, so channels-last cases also cover a dy whose layout differs."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*case.shape, generator=gen).to(DEVICE, dtype)


def run(fn, case: Case, inputs, dy):
    """y and the grads of (x, weight, bias, shift) (None where absent) through `fn`."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    x, weight, bias, shift = leaves
    y = fn(x, case.groups, weight, bias, EPS, shift, case.act)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def on_backend(name: str):
    def fn(*args):
        with sr3fast.backend(name):
            return ops.groupnorm_silu(*args)
    return fn


def torch_groupnorm_silu(x, groups, weight, bias, eps, shift, act):
    """Plain PyTorch in the inputs' dtype: the baseline of the three-way rule."""
    h = x if shift is None else x + shift.reshape(*shift.shape, *[1] * (x.dim() - 2))
    y = F.group_norm(h, groups, weight, bias, eps)
    return F.silu(y) if act else y


def fp32_tolerances(case: Case, inputs, dy) -> list[float]:
    """Tolerances of y, dx, dweight, dbias, dshift from the sizes of the terms each one sums
    (fp32_atol's random-walk bound), computed in float64 from the inputs:
      y   group sums of h (mean, var): error ~ |h|·rstd·|w| + |x̂|·|w|, over C/G·S terms
      dx  group sums of w·dz·x̂ (|SiLU'| ≤ 1.1), scaled by rstd, over C/G·S terms
      dweight, dbias  sums over B·S of dz·x̂ and dz;  dshift  S values of dx.
    x̂ = (h - mean)·rstd is a difference of terms of size rstd·|h| (y's tolerance counts them), so
    a float32 x̂ is off by roundings of rstd·|h|, not of |x̂|. They differ most in a group of one
    element: x̂ is exactly 0 there, but a kernel that rounds the mean once, or folds it into
    rstd·x - rstd·mean, returns about u·|h|·rstd with rstd = 1/sqrt(eps) ~ 316 amplifying that
    rounding (dweight = Σ dz·x̂ was off by 1.7e-5 so on a GPU, against a tolerance of 0 from |x̂|
    alone). So dweight's terms count as dz·max(|x̂|, rstd·|h|); with act, dz is computed from
    z = x̂·w + b, whose roundings of w·rstd·|h| move dz by |SiLU''| ≤ 1/2 times them: dbias's
    terms count as max(|dz|, |dy|·w·rstd·|h|/2), and dweight's gain that times |x̂|. In dx the
    error of x̂ enters only through A·δx̂ and δA·x̂, of the order of the terms' own roundings where
    x̂ is not small, and not at all in a one-element group (A = 0 and dx = 0 for any dz), so dx
    keeps the terms' bound. A real defect moves a gradient by a sizeable part of
    its terms (a mean left in that one-element group: rstd·|h|·|dz| ~ 500), far above these."""
    x, weight, bias, shift = (t.double() if t is not None else None for t in inputs)
    batch, chans = x.shape[:2]
    spatial = x[0, 0].numel()
    group_size = chans // case.groups * spatial
    h = x if shift is None else x + shift.reshape(batch, chans, *[1] * (x.dim() - 2))
    grouped = h.reshape(batch, case.groups, -1)
    rstd = torch.rsqrt(grouped.var(dim=-1, unbiased=False, keepdim=True) + EPS)
    xhat_max = ((grouped - grouped.mean(dim=-1, keepdim=True)) * rstd).abs().max().item()
    h_scaled_max = (grouped.abs() * rstd).max().item()
    w_max = weight.abs().max().item() if weight is not None else 1.0
    dy_max = dy.double().abs().max().item()
    dz_max = 1.1 * dy_max
    dz_terms = max(dz_max, 0.5 * dy_max * w_max * h_scaled_max) if case.act else dz_max
    dx_term = rstd.max().item() * w_max * dz_max * (1 + xhat_max)
    return [fp32_atol(group_size, w_max * (h_scaled_max + xhat_max)),
            fp32_atol(group_size, dx_term),
            fp32_atol(batch * spatial, dz_max * max(xhat_max, h_scaled_max)
                      + (dz_terms - dz_max) * xhat_max),
            fp32_atol(batch * spatial, dz_terms),
            fp32_atol(group_size * spatial, dx_term)]


NAMES = ("y", "dx", "dweight", "dbias", "dshift")


def assert_matches_reference(case: Case, fn, inputs, dy, label=""):
    """fn's y and gradients against the reference's, in fp32, with derived tolerances."""
    y, grads = run(fn, case, inputs, dy)
    y_ref, grads_ref = run(reference.groupnorm_silu, case, inputs, dy)
    if case.channels_last:
        assert y.movedim(1, -1).is_contiguous(), "channels-last input must give channels-last y"
    for name, got, want, atol in zip(NAMES, [y, *grads], [y_ref, *grads_ref],
                                     fp32_tolerances(case, inputs, dy)):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        max_err, _ = report(f"{label}{name}", got, want)
        assert max_err <= atol, f"{label}{name}: max error {max_err:.3e} > {atol:.3e}"


# ---------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["odd_7x5", "nhwc_odd_5x3", "act_false", "no_affine",
                                  "C3_G3_no_shift", "1d_spatial"])
def test_reference_matches_float64_torch(case):
    """reference.groupnorm_silu against F.silu(F.group_norm(x + shift)) in float64."""
    case = CASES[case]
    inputs = make_inputs(case)
    dy = grad_output(case)
    y, grads = run(reference.groupnorm_silu, case, inputs, dy)
    inputs64 = [t.double() if t is not None else None for t in inputs]
    y64, grads64 = run(torch_groupnorm_silu, case, inputs64, dy.double())
    for name, got, want, atol in zip(NAMES, [y, *grads], [y64, *grads64],
                                     fp32_tolerances(case, inputs, dy)):
        if want is not None:
            max_err, _ = report(f"reference {name}", got, want)
            assert max_err <= atol, f"{name}: {max_err:.3e} > {atol:.3e}"


# ---------------------------------------------------------------------------------------------
# Every fast backend against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", fast_backend_params("groupnorm_silu"))
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(backend, case):
    case = CASES[case]
    assert_matches_reference(case, on_backend(backend), make_inputs(case), grad_output(case))


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype, backend: str) -> float:
    """The largest error of `ref` converted to `dtype` as the backend converts: no kernel that
    returns `dtype` can be closer. GPUs round to nearest even; Triton's CPU interpreter (3.8)
    converts fp32 → bf16 by truncation (interpreter.py: _convert_float gets no rounding mode),
    which costs up to a whole ulp instead of half."""
    ref = ref.float()
    if dtype == torch.bfloat16 and backend == "triton" and DEVICE.type == "cpu":
        converted = (ref.view(torch.int32) & -0x10000).view(torch.float32)  # drop 16 low bits
    else:
        converted = ref.to(dtype).float()
    return (converted - ref).abs().max().item()


def assert_low_precision_matches(label, backend, case, inputs, dy, fn=None):
    """DESIGN.md's rule for y and every gradient: |fast − ref_fp32| ≤ 2·|torch − ref_fp32| + atol,
    where atol = the fp32 tolerance + the floor set by rounding the result to its dtype (on a
    handful of dweight/dbias values the baseline can round luckily close). fn defaults to
    ops.groupnorm_silu on `backend`."""
    dtype = inputs[0].dtype
    y, grads = run(fn or on_backend(backend), case, inputs, dy)
    inputs32 = [t.float() if t is not None else None for t in inputs]
    y_ref, grads_ref = run(reference.groupnorm_silu, case, inputs32, dy.float())
    y_base, grads_base = run(torch_groupnorm_silu, case, inputs, dy)
    for name, fast, ref, base, atol in zip(NAMES, [y, *grads], [y_ref, *grads_ref],
                                           [y_base, *grads_base],
                                           fp32_tolerances(case, inputs32, dy.float())):
        if ref is not None:
            assert fast.dtype == dtype, name
            assert_within_baseline(f"{label}{dtype} {name}", fast, ref, base,
                                   atol + rounding_floor(ref, dtype, backend))


LOW_PRECISION_CASES = ["batch1", "nhwc_odd_5x3", "C96_G32_cpg3_nhwc", "act_false", "groups_eq_C"]


@pytest.mark.parametrize("backend", fast_backend_params("groupnorm_silu"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_low_precision_within_torch_baseline(backend, dtype, case):
    case = CASES[case]
    assert_low_precision_matches("", backend, case, make_inputs(case, dtype),
                                 grad_output(case, dtype))


# ---------------------------------------------------------------------------------------------
# The Triton op's strategies, forced onto small shapes
# ---------------------------------------------------------------------------------------------

# thresholds that send a few-hundred-element group down each path: name -> (tuning, strategy)
TUNINGS = {
    "tile": (gn_kernels.Tuning(min_programs=1), "tile"),
    "loop": (gn_kernels.Tuning(register_tile=32, register_tile_backward=32, loop_tile=32,
                               min_programs=1), "loop"),
    "split": (gn_kernels.Tuning(split_tile=64, min_programs=1 << 20), "split"),
    "split_merge_kernel": (gn_kernels.Tuning(split_tile=64, min_programs=1 << 20,
                                             inline_merge=0), "split"),
}
# a "large group" in miniature: 3 channels per group (not a power of two) × 11×9 positions
LARGE_GROUP = {False: Case((2, 6, 11, 9), 2), True: Case((1, 6, 11, 9), 2, channels_last=True)}


@needs_triton
@pytest.mark.parametrize("strategy", list(TUNINGS))
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", [True, False], ids=["silu", "no_act"])
def test_triton_strategy_matches_reference(monkeypatch, strategy, nhwc, act):
    case = dataclasses.replace(LARGE_GROUP[nhwc], act=act, shift=act)
    tuning, expected = TUNINGS[strategy]
    monkeypatch.setattr(gn_kernels, "TUNING", tuning)
    batch, chans = case.shape[:2]
    spatial = math.prod(case.shape[2:])
    for backward in (False, True):
        plan = gn_kernels.plan(batch, chans, spatial, case.groups, nhwc, 1, backward=backward)
        assert plan.strategy == expected, plan
        if expected == "split":
            assert plan.num_splits > 1 and not plan.full_s, plan  # several, the last ragged
            assert plan.inline_merge == (strategy == "split"), plan
    assert_matches_reference(case, on_backend("triton"), make_inputs(case), grad_output(case),
                             label=f"{strategy} ")


@needs_triton
@settings(max_examples=10, deadline=None, derandomize=True)
@given(batch=st.integers(1, 3), groups=st.integers(1, 3), per_group=st.integers(1, 4),
       spatial=st.lists(st.integers(1, 7), min_size=0, max_size=3),
       nhwc=st.booleans(), shift=st.booleans(), affine=st.sampled_from(["both", "none", "bias"]),
       act=st.booleans(), strategy=st.sampled_from(list(TUNINGS)))
def test_triton_random_shapes_match_reference(batch, groups, per_group, spatial, nhwc, shift,
                                              affine, act, strategy):
    case = Case((batch, groups * per_group, *spatial), groups, channels_last=nhwc and bool(spatial),
                shift=shift, affine=affine, act=act)
    previous, gn_kernels.TUNING = gn_kernels.TUNING, TUNINGS[strategy][0]
    try:
        assert_matches_reference(case, on_backend("triton"), make_inputs(case, seed=batch),
                                 grad_output(case), label=f"{case} ")
    finally:
        gn_kernels.TUNING = previous


@needs_triton
@pytest.mark.parametrize("frozen", ["x", "affine", "shift", "all_but_shift"])
def test_triton_only_requested_gradients(frozen):
    """Inputs that do not require grad get None, and the others are still right."""
    case = CASES["nhwc_odd_5x3"]
    inputs = make_inputs(case)
    needs = {"x": (False, True, True, True), "affine": (True, False, False, True),
             "shift": (True, True, True, False), "all_but_shift": (False, False, False, True)}
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip(inputs, needs[frozen])]
    with sr3fast.backend("triton"):
        y = ops.groupnorm_silu(leaves[0], case.groups, leaves[1], leaves[2], EPS, leaves[3])
    y.backward(grad_output(case))
    _, grads_ref = run(reference.groupnorm_silu, case, inputs, grad_output(case))
    for name, leaf, want, atol in zip(NAMES[1:], leaves, grads_ref,
                                      fp32_tolerances(case, inputs, grad_output(case))[1:]):
        if not leaf.requires_grad:
            assert leaf.grad is None
        else:
            max_err, _ = report(name, leaf.grad, want)
            assert max_err <= atol


@needs_triton
def test_triton_mixed_dtypes_bf16_activations_fp32_parameters():
    """Autocast-style calls: each input is read in its own dtype and each gradient is returned
    in its input's dtype; the maths matches the reference on the same values up to rounding."""
    case = CASES["nhwc_odd_5x3"]
    x, weight, bias, shift = make_inputs(case)
    inputs = (x.to(torch.bfloat16), weight, bias, shift)
    dy = grad_output(case, torch.bfloat16)
    y, grads = run(on_backend("triton"), case, inputs, dy)
    inputs32 = [t.float() for t in inputs]
    y_ref, grads_ref = run(reference.groupnorm_silu, case, inputs32, dy.float())
    sources = (inputs[0], *inputs)  # y and dx take x's dtype
    for name, got, want, source, atol in zip(NAMES, [y, *grads], [y_ref, *grads_ref], sources,
                                             fp32_tolerances(case, inputs32, dy.float())):
        assert got.dtype == source.dtype, name
        floor = rounding_floor(want, got.dtype, "triton")
        max_err, _ = report(name, got, want)
        assert max_err <= atol + floor, f"{name}: {max_err:.3e} > {atol:.3e} + {floor:.3e}"


@needs_triton
def test_triton_non_dense_input_is_copied_not_misread():
    """A strided view (neither NCHW nor NHWC) runs on a contiguous copy."""
    case = CASES["odd_7x5"]
    x, weight, bias, shift = make_inputs(dataclasses.replace(case, shape=(2, 6, 7, 10)))
    inputs = (x[..., ::2], weight, bias, shift)
    assert not inputs[0].is_contiguous() and not inputs[0].movedim(1, -1).is_contiguous()
    assert_matches_reference(case, on_backend("triton"), inputs, grad_output(case))


@needs_triton
@pytest.mark.parametrize("strategy", ["tile", "split", "split_merge_kernel"])
def test_triton_is_deterministic(monkeypatch, strategy):
    """Fixed-order reductions (no atomics): two runs agree bit for bit, gradients included."""
    monkeypatch.setattr(gn_kernels, "TUNING", TUNINGS[strategy][0])
    case = LARGE_GROUP[True]
    inputs, dy = make_inputs(case), grad_output(case)
    first, second = (run(on_backend("triton"), case, inputs, dy) for _ in range(2))
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@needs_triton
def test_triton_rejects_integer_input():
    x = torch.ones(1, 4, 2, 2, dtype=torch.int32, device=DEVICE)
    with sr3fast.backend("triton"), pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.groupnorm_silu(x, 2)


# ---------------------------------------------------------------------------------------------
# Every autotuning config forced once: the autotuner only ever runs its pick
# ---------------------------------------------------------------------------------------------

# Each autotuned kernel: whether it runs in the backward, the strategies that launch it, and its
# prune rule (the autotuner only times the configs that rule keeps at the launch's sizes).
AUTOTUNED = {
    "_forward_group_kernel": (False, ("tile", "loop"), gn_kernels._keep_register_tiles),
    "_backward_group_kernel": (True, ("tile", "loop"), gn_kernels._keep_register_tiles),
    "_forward_partial_moments_kernel": (False, ("split",), gn_kernels._keep_register_tiles),
    "_backward_partial_sums_kernel": (True, ("split",), gn_kernels._keep_register_tiles),
    "_forward_normalize_kernel": (False, ("split",), gn_kernels._keep_stream_tiles),
    "_backward_input_grad_kernel": (True, ("split",), gn_kernels._keep_stream_tiles),
}
# SR3's GroupNorm problems (Table A.1 U-Nets, skip concatenations, 32 or 16 groups, batch 1-64):
# the list the compile check sweeps too.
from sr3fast.kernels.compile_check import sr3_groupnorm_problems  # noqa: E402


def launch_sizes(p: gn_kernels.Plan, spatial: int) -> dict:
    """The launch arguments an autotuned kernel's prune rule reads, under plan p."""
    return {"BLOCK_C": p.block_c, "BLOCK_S": p.block_s, "S": spatial}


@functools.lru_cache(maxsize=None)
def sr3_reachable(name: str) -> tuple:
    """The configs of kernel `name` that its prune rule keeps for some SR3 problem on an
    H100/H200 (132 SMs), in either memory order: the configs a GPU may ever pick."""
    backward, strategies, prune = AUTOTUNED[name]
    configs = getattr(gn_kernels, name).configs
    reached = []
    for (batch, chans, spatial, groups), nhwc in itertools.product(sr3_groupnorm_problems(),
                                                                   (False, True)):
        p = gn_kernels.plan(batch, chans, spatial, groups, nhwc, 132, backward=backward,
                            tuning=gn_kernels.Tuning())
        if p.strategy in strategies:
            reached += [cfg for cfg in prune(configs, launch_sizes(p, spatial))
                        if cfg not in reached]
    return tuple(reached)


def _channels(block_c: int, nhwc: bool) -> tuple[int, int] | None:
    """(channels, groups) whose group blocks are block_c wide (NCHW groups unpacked, as with
    Tuning(small_group=1)), preferring 2 groups; None if neither layout gives that width. NHWC
    needs ≥ 2 channels, or the tensor is contiguous and takes the NCHW path."""
    for chans, groups in ((2 * block_c, 2), (block_c, 1)):
        p = gn_kernels.plan(1, chans, 4096, groups, nhwc, 1,
                            tuning=gn_kernels.Tuning(small_group=1, min_programs=1))
        if p.block_c == block_c and (chans > 1 or not nhwc):
            return chans, groups
    return None


def forced_config_cases(name: str, config, nhwc: bool) -> list:
    """[(case, tuning, strategy)]: one small problem on each path that launches kernel `name`,
    sized so that its prune rule keeps `config` there (the autotuner could pick it):
      num_warps w  tiles of 256·w elements (8 per thread, the fewest the rule allows), so that on
                   a GPU each config runs the layout it would be picked for, not a degenerate one;
      BLOCK_S      the narrowest group block with ≥ 2K-element tiles (the rule's minimum).
    Spatial dims are 3 × W with ragged edges: the tile path holds 3/4 of a tile, the loop and
    split paths 1.5 tiles (a second, partial one). Strategies are forced through
    gn_kernels.Tuning's thresholds."""
    _, strategies, _ = AUTOTUNED[name]
    if "BLOCK_S" in config.kwargs:
        tile_s = config.kwargs["BLOCK_S"]
        block_c = next(c for c in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                       if c * tile_s >= 2048 and _channels(c, nhwc))
        tile = block_c * tile_s
    else:
        tile = 256 * config.num_warps
        block_c = gn_kernels.plan(1, 4, 4096, 2, nhwc, 1,
                                  tuning=gn_kernels.Tuning(small_group=1)).block_c
        tile_s = tile // block_c
    chans, groups = _channels(block_c, nhwc)
    cases = []
    for strategy in strategies:
        if strategy == "tile":
            spatial = 3 * (tile_s // 4 + 1)
            tuning = gn_kernels.Tuning(small_group=1, min_programs=1)
        elif strategy == "loop":
            spatial = 3 * (tile_s // 2 + 1)
            tuning = gn_kernels.Tuning(small_group=1, min_programs=1, loop_tile=tile,
                                       register_tile=tile, register_tile_backward=tile)
        else:
            spatial = 3 * (tile_s // 2 + 1)
            tuning = gn_kernels.Tuning(small_group=1, min_programs=1 << 20, split_tile=tile)
        cases.append((Case((1, chans, 3, spatial // 3), groups, channels_last=nhwc), tuning,
                      strategy))
    return cases


def assert_forward_matches_reference(case: Case, inputs, label=""):
    """y alone (no backward) against the reference, with y's derived fp32 tolerance."""
    x, weight, bias, shift = inputs
    with torch.no_grad():
        y = on_backend("triton")(x, case.groups, weight, bias, EPS, shift, case.act)
    y_ref = reference.groupnorm_silu(x, case.groups, weight, bias, EPS, shift, case.act)
    if case.channels_last:
        assert y.movedim(1, -1).is_contiguous(), "channels-last input must give channels-last y"
    atol = fp32_tolerances(case, inputs, grad_output(case))[0]
    max_err, _ = report(f"{label}y", y, y_ref)
    assert max_err <= atol, f"{label}y: max error {max_err:.3e} > {atol:.3e}"


def every_config_params() -> list:
    params = []
    for name in AUTOTUNED:
        for index, cfg in enumerate(getattr(gn_kernels, name).configs):
            tag = "".join(f"-{k}{v}" for k, v in cfg.kwargs.items()) + f"-w{cfg.num_warps}"
            params.append(pytest.param(name, index, id=f"{name.strip('_')}{tag}"))
    return params


def test_autotuned_kernels_are_all_known_and_pinnable(monkeypatch):
    """A kernel autotuned but missing from AUTOTUNED would never have its configs forced; and
    each one is declared through kernels/autotuning.py, so the pin switch cuts it to one config
    (a plain triton.autotune would time them all in the GPU's pinned test run)."""
    from triton.runtime.autotuner import Autotuner
    declared = {n for n, obj in vars(gn_kernels).items() if isinstance(obj, Autotuner)}
    assert declared == set(AUTOTUNED)
    sizes = {"BLOCK_C": 16, "BLOCK_S": 256, "S": 4096}  # several configs of each kernel fit
    monkeypatch.delenv(autotuning.PIN_VARIABLE, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in AUTOTUNED:
        kernel = getattr(gn_kernels, name)
        assert len(kernel.early_config_prune(kernel.configs, sizes)) > 1, name
        monkeypatch.setenv(autotuning.PIN_VARIABLE, "pinned")
        assert len(kernel.early_config_prune(kernel.configs, sizes)) == 1, name
        monkeypatch.delenv(autotuning.PIN_VARIABLE)


@needs_triton
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name, index", every_config_params())
def test_triton_every_config_matches_reference(monkeypatch, name, index, nhwc):
    """Kernel `name` forced to its config `index` (autotuning.forced) against the reference with
    derived fp32 tolerances (backward kernels: y and every gradient; forward kernels: y), on
    each path that launches it, at a small problem where its prune rule would keep that config
    (forced_config_cases). Tested are the configs some SR3 GroupNorm reaches on a GPU
    (sr3_reachable: the prune rules at every SR3 problem, both memory orders, batch 1 to 64);
    today that is all of them, so none is skipped for it. Under the interpreter num_warps has
    no effect: a config that differs from an earlier one only in num_warps has its routing
    checked, then is skipped (the same computation); on a GPU every config runs."""
    kernel = getattr(gn_kernels, name)
    config = kernel.configs[index]
    backward, _, prune = AUTOTUNED[name]
    if config not in sr3_reachable(name):
        pytest.skip(f"{config}: the prune rule excludes it at every SR3 problem")
    cases = forced_config_cases(name, config, nhwc)
    for case, tuning, strategy in cases:  # the path meant, at sizes where `config` is a candidate
        batch, chans = case.shape[:2]
        spatial = math.prod(case.shape[2:])
        p = gn_kernels.plan(batch, chans, spatial, case.groups, nhwc, 1, backward=backward,
                            tuning=tuning)
        assert p.strategy == strategy, (case, p)
        assert config in prune(kernel.configs, launch_sizes(p, spatial)), (case, p)
    if autotuning.interpreting() and any(earlier.kwargs == config.kwargs
                                         for earlier in kernel.configs[:index]):
        pytest.skip("the interpreter ignores num_warps: computed as an earlier config")
    for case, tuning, strategy in cases:
        monkeypatch.setattr(gn_kernels, "TUNING", tuning)
        kernel.best_config = None
        inputs = make_inputs(case)
        with autotuning.forced(kernel, config):
            if backward:
                assert_matches_reference(case, on_backend("triton"), inputs, grad_output(case),
                                         label=f"{strategy} ")
            else:
                assert_forward_matches_reference(case, inputs, label=f"{strategy} ")
        assert kernel.best_config is config, f"{name} did not run on the {strategy} path"


# ---------------------------------------------------------------------------------------------
# Plans for SR3's shapes (pure Python: pins the module docstring's table)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, groups, nhwc, strategy, programs", [
    ((1, 64, 128, 128), 32, False, "split+inline merge", 256),
    ((16, 512, 16, 16), 32, False, "tile", 512),
    ((4, 128, 64, 64), 32, False, "tile", 128),
    ((1, 1024, 32, 32), 16, False, "split+inline merge", 256),
    ((1, 64, 128, 128), 32, True, "split+merge kernel", 256),
    ((16, 512, 16, 16), 32, True, "tile", 128),
    ((4, 128, 64, 64), 32, True, "split+merge kernel", 512),
    ((1, 1024, 32, 32), 16, True, "split+inline merge", 256),
    ((16, 64, 128, 128), 32, False, "loop", 512),
])
def test_plan_for_sr3_shapes_on_h100(shape, groups, nhwc, strategy, programs):
    batch, chans, height, width = shape
    plan = gn_kernels.plan(batch, chans, height * width, groups, nhwc, multiprocessors=132,
                           tuning=gn_kernels.Tuning())
    print(plan)
    if plan.strategy == "split":
        assert f"split+{'inline merge' if plan.inline_merge else 'merge kernel'}" == strategy
    else:
        assert plan.strategy == strategy
    assert batch * plan.num_blocks * plan.num_splits == programs
    assert plan.full_c and plan.full_s, "SR3 shapes need no masks"
    if nhwc:
        assert plan.block_c * 2 >= 64, "NHWC rows should span ≥ 64 bytes of bf16"


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

OPCHECK_UTILS = [
    "test_schema", "test_autograd_registration", "test_faketensor",
    pytest.param("test_aot_dispatch_dynamic", marks=pytest.mark.skipif(
        DEVICE.type != "cuda", reason="under TRITON_INTERPRET=1, wrap_triton hands the raw "
        "kernel to AOT tracing, whose autotuner cannot hash the SymInt sizes; runs on CUDA")),
]


@needs_triton
@pytest.mark.parametrize("util", OPCHECK_UTILS)
def test_opcheck_forward_and_backward_ops(util):
    from sr3fast.ops.triton import groupnorm_silu as registered  # noqa: F401 (registers the ops)
    case = CASES["nhwc_odd_5x3"]
    x, weight, bias, shift = (t.requires_grad_() for t in make_inputs(case))
    torch.library.opcheck(torch.ops.sr3fast.groupnorm_silu_triton.default,
                          (x, case.groups, weight, bias, EPS, shift, True), test_utils=(util,))
    _, mean, rstd = torch.ops.sr3fast.groupnorm_silu_triton(
        x.detach(), case.groups, weight.detach(), bias.detach(), EPS, shift.detach(), True)
    torch.library.opcheck(
        torch.ops.sr3fast.groupnorm_silu_backward_triton.default,
        (grad_output(case), x.detach(), mean, rstd, case.groups, weight.detach(), bias.detach(),
         shift.detach(), True, True, True), test_utils=(util,))


# ---------------------------------------------------------------------------------------------
# CUDA only: SR3's real shapes, torch.compile, CUDA graphs
# ---------------------------------------------------------------------------------------------

SR3_SHAPES = [((1, 64, 128, 128), 32), ((16, 512, 16, 16), 32), ((4, 128, 64, 64), 32),
              ((1, 1024, 32, 32), 16)]


@needs_cuda
@pytest.mark.parametrize("backend", fast_backend_params("groupnorm_silu"))
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape, groups", SR3_SHAPES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else str(v))
def test_cuda_sr3_shapes_bf16(backend, shape, groups, nhwc):
    case = Case(shape, groups, channels_last=nhwc)
    assert_low_precision_matches(f"{shape} ", backend, case, make_inputs(case, torch.bfloat16),
                                 grad_output(case, torch.bfloat16))


@needs_cuda
@needs_triton
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_cuda_compile_fullgraph_matches_reference(nhwc):
    """torch.compile traces the triton_ops (forward and backward) without graph breaks; Inductor
    may re-tune the kernels, so the result is held to the bf16 rule, not bitwise to eager."""
    case = Case((2, 64, 16, 16), 32, channels_last=nhwc)
    torch._dynamo.reset()
    compiled = torch.compile(ops.groupnorm_silu, fullgraph=True)
    with sr3fast.backend("triton"):
        assert_low_precision_matches("compiled ", "triton", case, make_inputs(case, torch.bfloat16),
                                     grad_output(case, torch.bfloat16), fn=compiled)


@needs_cuda
@needs_triton
def test_cuda_graph_replay_matches_eager():
    """After one warm-up call (autotuning), the forward captures into a CUDA graph."""
    case = Case((1, 64, 128, 128), 32)
    x, weight, bias, shift = make_inputs(case, torch.bfloat16)
    with sr3fast.backend("triton"):
        ops.groupnorm_silu(x, 32, weight, bias, EPS, shift)  # warm-up: autotunes, compiles
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.groupnorm_silu(x, 32, weight, bias, EPS, shift)
    x.copy_(x.roll(1, dims=-1) * 0.5)  # new data in the captured input
    graph.replay()
    torch.cuda.synchronize()
    expected = reference.groupnorm_silu(x.float(), 32, weight.float(), bias.float(), EPS,
                                        shift.float())
    baseline = torch_groupnorm_silu(x, 32, weight, bias, EPS, shift, True)
    atol = fp32_tolerances(case, [x.float(), weight.float(), bias.float(), shift.float()],
                           x.float())[0]
    assert_within_baseline("graph replay", out, expected, baseline,
                           atol + rounding_floor(expected, torch.bfloat16, "triton"))
