"""The compiled extension sr3fast._C (csrc/): its ops against sr3fast.reference, their PyTorch 2
registration (opcheck, autograd, fake kernels), the backend dispatch, and the CMake build.

CPU tests run everywhere the extension is built; CUDA tests need a GPU and a CUDA build.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sr3fast._C", reason="the extension sr3fast._C is not built "
                    "(python setup.py build_ext --inplace)")

import sr3fast  # noqa: E402
from sr3fast import backends, reference  # noqa: E402
from sr3fast.ops.extension import has_cuda_kernels  # noqa: E402
from sr3fast.ops.extension.groupnorm_silu import groupnorm_silu  # noqa: E402
from sr3fast.ops.extension.reverse_step import reverse_step  # noqa: E402

from support import assert_within_baseline, fp32_atol, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_CUDA_REASON = ("no CUDA device" if not torch.cuda.is_available() else
                "sr3fast._C was built without CUDA kernels")
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not (torch.cuda.is_available() and has_cuda_kernels()), reason=_CUDA_REASON)]),
]
cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and has_cuda_kernels()),
                               reason=_CUDA_REASON)

# DESIGN.md's edge cases: (batch, channels, spatial, groups)
SHAPES = {
    "1x1": (2, 8, (1, 1), 4),
    "odd_hw": (2, 12, (7, 5), 3),
    "groups_eq_channels": (2, 16, (5, 5), 16),
    "C3": (2, 3, (9, 9), 1),
    "batch1": (1, 64, (32, 32), 32),
    "batch16": (16, 32, (8, 8), 8),
    "multi_chunk": (2, 8, (72, 72), 2),  # groups spread over several chunks (tasks / blocks)
}
# (affine, shift, act): the default SR3 use, and each feature off
OPTIONS = {
    "all": (True, True, True),
    "no_shift": (True, False, True),
    "no_act": (True, True, False),
    "no_affine": (False, True, True),
    "plain_groupnorm": (False, False, False),
}


def make_inputs(shape_id, options_id, device, dtype=torch.float32, channels_last=False, seed=0):
    batch, channels, spatial, groups = SHAPES[shape_id]
    affine, with_shift, act = OPTIONS[options_id]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, generator=gen) * 1.5 + 0.3
    weight = 1 + 0.5 * torch.randn(channels, generator=gen) if affine else None
    bias = 0.5 * torch.randn(channels, generator=gen) if affine else None
    shift = torch.randn(batch, channels, generator=gen) if with_shift else None
    grad_y = torch.randn(x.shape, generator=gen)

    def to(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    x, grad_y = to(x), to(grad_y)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    return dict(x=x, num_groups=groups, weight=to(weight), bias=to(bias), shift=to(shift),
                act=act), grad_y


def call(fn, inputs, grad_y=None, upcast=False):
    """fn's output and, if grad_y is given, the gradients of the tensor inputs that exist."""
    names = ("x", "weight", "bias", "shift")
    tensors = {n: inputs[n] for n in names}
    if upcast:
        tensors = {n: None if t is None else t.float() for n, t in tensors.items()}
    leaves = {n: None if t is None else t.detach().requires_grad_(grad_y is not None)
              for n, t in tensors.items()}
    y = fn(leaves["x"], inputs["num_groups"], leaves["weight"], leaves["bias"], 1e-5,
           leaves["shift"], inputs["act"])
    if grad_y is None:
        return y.detach(), {}
    present = [n for n in names if leaves[n] is not None]
    grads = torch.autograd.grad(y, [leaves[n] for n in present], grad_y.to(y.dtype))
    return y.detach(), dict(zip(present, grads))


def torch_groupnorm_silu(x, num_groups, weight, bias, eps, shift, act):
    """Plain PyTorch in x's dtype: the baseline of DESIGN.md's reduced-precision rule."""
    h = x if shift is None else x + shift.reshape(*shift.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(h, num_groups, weight, bias, eps)
    return F.silu(y) if act else y


def normalization_scale(inputs):
    """max over elements of rstd * |x + shift|: how much the normalisation magnifies relative
    rounding errors in its input (1 for data of unit scale, large for near-constant groups)."""
    x = inputs["x"].float()
    batch, channels = x.shape[:2]
    h = x if inputs["shift"] is None else x + inputs["shift"].float().reshape(
        batch, channels, *([1] * (x.dim() - 2)))
    grouped = h.reshape(batch, inputs["num_groups"], -1)
    rstd = torch.rsqrt(grouped.var(dim=-1, unbiased=False, keepdim=True) + 1e-5)
    return max(1.0, (rstd * grouped.abs()).max().item())


def group_size(inputs):
    x = inputs["x"]
    return x[0].numel() // inputs["num_groups"]


def gradient_term_scales(inputs, grad_y):
    """The size of the terms each gradient is a sum of (float64, from the inputs), which is what
    bounds its float32 rounding error, rather than the size of the gradient itself:

        dx_i = r w_c dz_i - r A x^_i - r B,  A = mean over the group of w dz x^,  B = mean of w dz

    with r the group's rstd and x^ = (h - mean) r. In a group of few elements whose variance is far
    above eps, x^ is close to +-1 and the three terms cancel almost exactly (the normalised output
    barely depends on x): dx is orders of magnitude below its terms, and any float32 evaluation of
    it, the reference's included, is off by a few roundings of the terms. A kernel whose operations
    differ from the reference's by an ulp or two (CUDA's rsqrtf, fast-math division and __expf)
    moves dx by about as much, which twice the reference's own (lucky) error cannot bound. Returns
    per gradient: the largest sum of the three terms' sizes for dx; for grad_shift, the sum of dx
    over positions, the root of the sum of their squares (random-walk, as fp32_atol); the largest
    single term for grad_weight (dz x^) and grad_bias (dz), which sum over batch and positions."""
    x = inputs["x"].double()
    batch, channels = x.shape[:2]
    groups = inputs["num_groups"]
    per_channel = (batch, channels) + (1,) * (x.dim() - 2)
    h = x if inputs["shift"] is None else x + inputs["shift"].double().reshape(per_channel)
    grouped = h.reshape(batch, groups, -1)
    rstd = torch.rsqrt(grouped.var(dim=-1, unbiased=False, keepdim=True) + 1e-5)
    xhat = ((grouped - grouped.mean(dim=-1, keepdim=True)) * rstd).reshape(x.shape)
    r = rstd.expand(batch, groups, grouped.shape[-1]).reshape(x.shape)
    w = (inputs["weight"].double().reshape(1, channels, *per_channel[2:])
         if inputs["weight"] is not None else torch.ones(per_channel[1:], dtype=x.dtype))
    z = xhat * w
    if inputs["bias"] is not None:
        z = z + inputs["bias"].double().reshape(1, channels, *per_channel[2:])
    dy = grad_y.double()
    if inputs["act"]:
        s = torch.sigmoid(z)
        dz = dy * s * (1 + z * (1 - s))
    else:
        dz = dy

    def group_mean(t):  # of each element's group, broadcast back to the element
        means = t.reshape(batch, groups, -1).mean(dim=-1, keepdim=True)
        return means.expand(batch, groups, grouped.shape[-1]).reshape(x.shape)

    wdz = (w * dz).abs()
    dx_terms = r * (wdz + xhat.abs() * group_mean(wdz * xhat.abs()) + group_mean(wdz))
    # grad_shift sums dx over positions, their errors adding as a random walk (fp32_atol's model)
    shift_terms = dx_terms.reshape(batch, channels, -1).square().sum(dim=-1).sqrt()
    return {"x": dx_terms.max().item(), "shift": shift_terms.max().item(),
            "weight": (dz * xhat).abs().max().item(), "bias": dz.abs().max().item()}


# ---- registration ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("options_id", ["all", "plain_groupnorm"])
def test_opcheck_groupnorm_silu(device, channels_last, options_id):
    inputs, grad_y = make_inputs("odd_hw", options_id, device, channels_last=channels_last)
    args = [inputs["x"].requires_grad_(), inputs["num_groups"], inputs["weight"], inputs["bias"],
            1e-5, inputs["shift"], inputs["act"]]
    torch.library.opcheck(torch.ops.sr3fast.groupnorm_silu.default, args)
    _, mean, rstd = torch.ops.sr3fast.groupnorm_silu(*args)
    backward_args = [grad_y, inputs["x"].detach(), mean, rstd, inputs["num_groups"],
                     inputs["weight"], inputs["bias"], inputs["shift"], inputs["act"]]
    torch.library.opcheck(torch.ops.sr3fast.groupnorm_silu_backward.default, backward_args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_opcheck_reverse_step(device, channels_last):
    y_t, eps, coefs, noise = step_inputs(device, channels_last=channels_last)
    torch.library.opcheck(torch.ops.sr3fast.reverse_step.default, (y_t, eps, coefs, noise, 1.0))
    # Drawn noise differs between calls, so only the checks that do not compare two runs' values.
    torch.library.opcheck(torch.ops.sr3fast.reverse_step.default, (y_t, eps, coefs),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_opcheck_reverse_step_multistep(device, channels_last):
    y_t, eps, coefs, noise, x0_prev = multistep_inputs(device, channels_last=channels_last)
    op = torch.ops.sr3fast.reverse_step_multistep.default
    torch.library.opcheck(op, (y_t, eps, coefs, x0_prev, noise, 1.0))
    torch.library.opcheck(op, (y_t, eps, coefs, x0_prev.float(), noise))  # history in float32
    # Drawn noise differs between calls, so only the checks that do not compare two runs' values.
    torch.library.opcheck(op, (y_t, eps, coefs, x0_prev), test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_the_ops_without_graph_breaks():
    inputs, _ = make_inputs("odd_hw", "all", "cpu")
    y_t, eps, coefs, noise = step_inputs("cpu")

    history = torch.randn(y_t.shape, generator=torch.Generator().manual_seed(5))
    wide = torch.cat([coefs, torch.full((coefs.shape[0], 1), -0.5)], dim=1)

    def both(x, weight, bias, shift, y_t, eps, coefs, noise, history, wide):
        h = groupnorm_silu(x, inputs["num_groups"], weight, bias, 1e-5, shift, True)
        return (h, reverse_step(y_t, eps, coefs, noise, 1.0),
                *reverse_step(y_t, eps, wide, noise, 1.0, x0_prev=history))

    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["shift"], y_t, eps, coefs, noise,
            history, wide)
    compiled = torch.compile(both, backend="aot_eager", fullgraph=True, dynamic=False)
    for got, want in zip(compiled(*args), both(*args)):
        assert torch.equal(got, want)


# ---- groupnorm_silu against the reference ----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("options_id", list(OPTIONS))
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_groupnorm_silu_fp32_matches_reference(shape_id, options_id, channels_last, device):
    """DESIGN.md's rule at float32: against float64 maths, the error is at most twice that of the
    float32 reference, plus the summation-order allowance (fp32_atol) on values of the size of
    the terms each result sums (`gradient_term_scales`), or of the result where that is larger.
    (Neither a fixed tolerance nor one on the result's size can serve: in groups of a few
    elements dx is a tiny difference of large terms, and any float32 computation of it, the
    reference's included, is inexact by roundings of those terms.)"""
    inputs, grad_y = make_inputs(shape_id, options_id, device, channels_last=channels_last)
    y, grads = call(groupnorm_silu, inputs, grad_y)
    y_ref, grads_ref = call(reference.groupnorm_silu, inputs, grad_y)
    inputs64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    y_64, grads_64 = call(torch_groupnorm_silu, inputs64, grad_y.double())
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    if channels_last:
        assert y.stride() == inputs["x"].stride(), "the output keeps the input's layout"
    reductions = max(group_size(inputs), inputs["x"].shape[0] * inputs["x"][0, 0].numel())
    atol = fp32_atol(group_size(inputs), y_64.abs().max().item())
    assert_within_baseline("y", y, y_64, y_ref, atol)
    assert set(grads) == set(grads_ref)
    terms = gradient_term_scales(inputs, grad_y)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and grad.shape == grads_ref[name].shape, name
        magnitude = grads_64[name].abs().max().item()
        # dx and grad_shift: group sums (A, B) in the terms; grad_weight, grad_bias: sums over
        # the batch and positions
        terms_atol = fp32_atol(group_size(inputs) if name in ("x", "shift") else reductions,
                               terms[name])
        atol = max(fp32_atol(reductions, magnitude), terms_atol)
        assert_within_baseline(f"grad_{name}", grad, grads_64[name], grads_ref[name], atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("options_id", ["all", "no_shift", "plain_groupnorm"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_groupnorm_silu_reduced_precision(dtype, shape_id, options_id, channels_last, device):
    """DESIGN.md's rule: error vs the fp32 reference <= 2 x that of plain PyTorch in the same
    dtype (+ the fp32 allowance of the test above)."""
    inputs, grad_y = make_inputs(shape_id, options_id, device, dtype, channels_last)
    y, grads = call(groupnorm_silu, inputs, grad_y)
    y_ref, grads_ref = call(reference.groupnorm_silu, inputs, grad_y, upcast=True)
    y_base, grads_base = call(torch_groupnorm_silu, inputs, grad_y)
    assert y.dtype == dtype
    scale = normalization_scale(inputs)
    atol = fp32_atol(group_size(inputs), scale * y_ref.abs().max().item())
    assert_within_baseline("y", y, y_ref, y_base, atol)
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        atol = fp32_atol(inputs["x"].shape[0] * group_size(inputs),
                         scale * grads_ref[name].abs().max().item())
        assert_within_baseline(f"grad_{name}", grad, grads_ref[name], grads_base[name], atol)


@pytest.mark.parametrize("device", DEVICES)
def test_groupnorm_silu_mixed_parameter_dtypes(device):
    """bf16 activations with float32 parameters (autocast) and with parameters of mixed dtypes."""
    inputs, _ = make_inputs("odd_hw", "all", device, torch.bfloat16)
    y_ref, _ = call(reference.groupnorm_silu, inputs, upcast=True)
    y_base, _ = call(torch_groupnorm_silu, inputs)
    for name in ("weight", "shift"):
        mixed = dict(inputs, **{name: inputs[name].float()})
        y, _ = call(groupnorm_silu, mixed)
        assert_within_baseline(f"fp32 {name}", y, y_ref, y_base, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_groupnorm_silu_reads_other_layouts_as_contiguous(device):
    inputs, _ = make_inputs("odd_hw", "all", device)
    x = inputs["x"].transpose(2, 3)  # neither contiguous nor channels-last
    y = groupnorm_silu(x, inputs["num_groups"], inputs["weight"], inputs["bias"], 1e-5,
                       inputs["shift"], True)
    y_ref = reference.groupnorm_silu(x, inputs["num_groups"], inputs["weight"], inputs["bias"],
                                     1e-5, inputs["shift"], True)
    assert y.is_contiguous()
    max_err, _ = report("y", y, y_ref)
    assert max_err <= fp32_atol(group_size(inputs), 8.0)


@pytest.mark.parametrize("device", DEVICES)
def test_groupnorm_silu_statistics_are_float32(device):
    inputs, _ = make_inputs("batch16", "all", device, torch.bfloat16)
    _, mean, rstd = torch.ops.sr3fast.groupnorm_silu(
        inputs["x"], inputs["num_groups"], inputs["weight"], inputs["bias"], 1e-5, inputs["shift"])
    assert mean.dtype == rstd.dtype == torch.float32
    h = (inputs["x"].float() + inputs["shift"].float()[:, :, None, None])
    grouped = h.reshape(h.shape[0], inputs["num_groups"], -1)
    report("mean", mean, grouped.mean(-1))
    assert torch.allclose(mean, grouped.mean(-1), rtol=0, atol=fp32_atol(grouped.shape[-1], 8.0))
    want_rstd = torch.rsqrt(grouped.var(-1, unbiased=False) + 1e-5)
    report("rstd", rstd, want_rstd)
    assert torch.allclose(rstd, want_rstd, rtol=fp32_atol(grouped.shape[-1], 8.0), atol=0)


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_groupnorm_silu_cuda_graph_replay_matches_eager(channels_last):
    """Forward and backward launch on the current stream with no host synchronisation, so a
    captured graph replays them; batch 1 with large groups takes the split-group path."""
    x = torch.randn(1, 64, 64, 64, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    shift, grad_y = torch.randn(1, 64, device="cuda"), torch.randn_like(x)
    op, backward = torch.ops.sr3fast.groupnorm_silu, torch.ops.sr3fast.groupnorm_silu_backward
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graphs require
        y, mean, rstd = op(x, 32, weight, bias, 1e-5, shift, True)
        backward(grad_y, x, mean, rstd, 32, weight, bias, shift, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, mean, rstd = op(x, 32, weight, bias, 1e-5, shift, True)
        grads = backward(grad_y, x, mean, rstd, 32, weight, bias, shift, True)
    x.copy_(torch.randn_like(x))  # new input, same buffer
    graph.replay()
    want_y, want_mean, want_rstd = op(x, 32, weight, bias, 1e-5, shift, True)
    want_grads = backward(grad_y, x, want_mean, want_rstd, 32, weight, bias, shift, True)
    assert torch.equal(y, want_y)
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_groupnorm_silu_errors_say_what_is_wrong(device):
    x = torch.randn(2, 6, 4, 4, device=device)
    with pytest.raises(RuntimeError, match="num_groups=4 must divide the 6 channels"):
        torch.ops.sr3fast.groupnorm_silu(x, 4)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.sr3fast.groupnorm_silu(x.double(), 3)
    with pytest.raises(RuntimeError, match=r"shift must have shape \[2, 6\]"):
        torch.ops.sr3fast.groupnorm_silu(x, 3, shift=torch.zeros(6, device=device))


# ---- reverse_step ----------------------------------------------------------------------------

def step_inputs(device, dtype=torch.float32, shape=(3, 3, 9, 7), channels_last=False, seed=0,
                sigma=0.3):
    gen = torch.Generator().manual_seed(seed)
    y_t = torch.randn(shape, generator=gen)
    eps = torch.randn(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    batch = shape[0]
    coefs = torch.stack([1 + torch.rand(batch, generator=gen), torch.rand(batch, generator=gen),
                         torch.rand(batch, generator=gen), torch.rand(batch, generator=gen),
                         torch.full((batch,), sigma)], dim=1)
    y_t, eps, noise = (t.to(device, dtype) for t in (y_t, eps, noise))
    if channels_last:
        y_t, eps, noise = (t.contiguous(memory_format=torch.channels_last)
                           for t in (y_t, eps, noise))
    return y_t, eps, coefs.to(device), noise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clip", "clip"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 3, 9, 7), (2, 4, 16, 16), (1, 1, 1, 1)],
                         ids=["odd", "aligned", "1x1"])
def test_reverse_step_with_given_noise_is_exact(shape, dtype, channels_last, clip, device):
    """Same float32 operations in the same order as the reference: equal bit for bit."""
    y_t, eps, coefs, noise = step_inputs(device, dtype, shape, channels_last)
    out = reverse_step(y_t, eps, coefs, noise, clip)
    want = reference.reverse_step(y_t, eps, coefs, noise, clip)
    report("reverse_step", out, want)
    assert out.dtype == dtype and out.stride() == y_t.stride()
    assert torch.equal(out, want)
    if clip is not None:  # the clamp was active for some elements, or the test proves nothing
        a, b = coefs[:, 0].reshape(-1, 1, 1, 1), coefs[:, 1].reshape(-1, 1, 1, 1)
        x0 = a * y_t.float() - b * eps.float()
        assert (x0.abs() > clip).any()


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_mixed_dtypes_are_exact(device):
    y_t, eps, coefs, noise = step_inputs(device, torch.bfloat16)
    for e, n in ((eps.float(), noise), (eps, noise.float()), (eps.float(), noise.float())):
        assert torch.equal(reverse_step(y_t, e, coefs, n), reference.reverse_step(y_t, e, coefs, n))


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_sigma_zero_ignores_noise(device):
    y_t, eps, coefs, noise = step_inputs(device, sigma=0.0)
    want = reference.reverse_step(y_t, eps, coefs, torch.zeros_like(noise))
    assert torch.equal(reverse_step(y_t, eps, coefs), want)
    assert torch.equal(reverse_step(y_t, eps, coefs, noise), want)


def test_reverse_step_cpu_draws_noise_like_the_reference():
    y_t, eps, coefs, _ = step_inputs("cpu", channels_last=True)
    first = reverse_step(y_t, eps, coefs, generator=torch.Generator().manual_seed(7))
    again = reverse_step(y_t, eps, coefs, generator=torch.Generator().manual_seed(7))
    other = reverse_step(y_t, eps, coefs, generator=torch.Generator().manual_seed(8))
    want = reference.reverse_step(y_t, eps, coefs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again) and torch.equal(first, want)
    assert not torch.equal(first, other)


@cuda_only
@pytest.mark.cuda
def test_reverse_step_cuda_draws_standard_normal_noise_reproducibly():
    shape = (4, 3, 256, 256)
    y_t = torch.zeros(shape, device="cuda")
    coefs = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]] * shape[0], device="cuda")  # y_prev = z
    z = reverse_step(y_t, y_t, coefs, generator=torch.Generator("cuda").manual_seed(3))
    again = reverse_step(y_t, y_t, coefs, generator=torch.Generator("cuda").manual_seed(3))
    assert torch.equal(z, again)
    n = z.numel()
    print(f"z: mean {z.mean().item():.3e}, std {z.std().item():.4f} over {n} draws")
    assert abs(z.mean().item()) < 6 / n ** 0.5  # 6 standard errors
    assert abs(z.std().item() - 1) < 6 * (0.5 / n) ** 0.5
    # an odd number of elements per sample takes the element-wise path
    odd = reverse_step(y_t[:, :, 1:, 1:], y_t[:, :, 1:, 1:], coefs,
                       generator=torch.Generator("cuda").manual_seed(3))
    assert torch.isfinite(odd).all() and abs(odd.std().item() - 1) < 0.01


@cuda_only
@pytest.mark.cuda
def test_reverse_step_cuda_takes_a_generator_with_or_without_device_index():
    """torch.Generator("cuda") has no device index and stands for the current device, as in
    PyTorch's own random ops; it draws what a generator naming that device draws. A generator of
    another device type is refused, saying which devices they are."""
    y_t = torch.zeros(2, 3, 8, 8, device="cuda")
    coefs = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]] * 2, device="cuda")  # y_prev = z
    index = torch.cuda.current_device()
    bare = reverse_step(y_t, y_t, coefs, generator=torch.Generator("cuda").manual_seed(5))
    named = reverse_step(y_t, y_t, coefs, generator=torch.Generator(f"cuda:{index}").manual_seed(5))
    assert torch.equal(bare, named) and bare.std() > 0.5
    with pytest.raises(RuntimeError, match=r"the generator is on cpu but y_t on cuda:\d"):
        reverse_step(y_t, y_t, coefs, generator=torch.Generator().manual_seed(5))


@cuda_only
@pytest.mark.cuda
def test_reverse_step_cuda_graph_replays_draw_fresh_noise():
    shape = (2, 3, 64, 64)
    y_t = torch.zeros(shape, device="cuda")
    coefs = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]] * shape[0], device="cuda")
    reverse_step(y_t, y_t, coefs)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = reverse_step(y_t, y_t, coefs)
    draws = []
    for _ in range(3):
        graph.replay()
        draws.append(out.clone())
    torch.cuda.synchronize()
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    for z in draws:
        assert abs(z.std().item() - 1) < 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_errors_say_what_is_wrong(device):
    y_t, eps, coefs, noise = step_inputs(device)
    with pytest.raises(RuntimeError, match=r"coefs must be a float32 tensor of shape \(3, 5\)"):
        torch.ops.sr3fast.reverse_step(y_t, eps, coefs.double())
    with pytest.raises(RuntimeError, match="clip must be positive"):
        torch.ops.sr3fast.reverse_step(y_t, eps, coefs, noise, -1.0)
    with pytest.raises(RuntimeError, match="eps must match y_t"):
        torch.ops.sr3fast.reverse_step(y_t, eps[:1], coefs)


# ---- reverse_step_multistep -------------------------------------------------------------------

# History depths of the multistep op: x0_prev only (DPM-Solver++ 2M), and x0_prev2 too (3M).
DEPTHS = [pytest.param(1, id="history1"), pytest.param(2, id="history2")]


def multistep_inputs(device, dtype=torch.float32, shape=(3, 3, 9, 7), channels_last=False,
                     seed=0, sigma=0.3, x0_prev_dtype=None, depth=1):
    """step_inputs plus the history: coefs (B, 7), m2 different per sample in [-1, 0] (DPM-Solver++
    2M's m2 = -r/2·(...) is negative), m3 in [0.2, 1] (nonzero: with depth 1 it must go unread);
    and `past`, the op's history keyword arguments for `depth`: x0_prev, and with depth 2
    x0_prev2, independent N(0, 1) draws in x0_prev_dtype (None: y_t's)."""
    y_t, eps, coefs, noise = step_inputs(device, dtype, shape, channels_last, seed, sigma)
    gen = torch.Generator().manual_seed(seed + 100)
    m2 = -torch.rand(shape[0], 1, generator=gen)
    m3 = 0.2 + 0.8 * torch.rand(shape[0], 1, generator=gen)
    names = ("x0_prev", "x0_prev2")[:depth]
    past = {name: torch.randn(shape, generator=gen).to(device, x0_prev_dtype or dtype)
            for name in names}
    if channels_last:
        past = {name: t.contiguous(memory_format=torch.channels_last) for name, t in past.items()}
    return y_t, eps, torch.cat([coefs, m2.to(device), m3.to(device)], dim=1), noise, past


def _expected_multistep(y_t, eps, coefs, noise, clip, x0_prev, x0_prev2=None):
    """The contract's formula written out in float32, in its order of operations, independent of
    sr3fast.reference and of the kernels: (((m0·x0 + m1·y) + m2·x0_prev) [+ m3·x0_prev2]) + sigma·z,
    each product and sum rounded on its own (torch's elementwise CPU and CUDA ops never fuse)."""
    width = coefs.shape[1]
    a, b, m0, m1, sigma, m2, *m3 = coefs.reshape(
        coefs.shape[0], width, *([1] * (y_t.dim() - 1))).unbind(dim=1)
    y = y_t.float()
    x0 = a * y - b * eps.float()
    if clip is not None:
        x0 = torch.clamp(x0, -clip, clip)
    y_prev = (m0 * x0 + m1 * y) + m2 * x0_prev.float()
    if x0_prev2 is not None:
        y_prev = y_prev + m3[0] * x0_prev2.float()
    y_prev = y_prev + sigma * noise.float()
    return y_prev.to(y_t.dtype), x0.to(y_t.dtype)


def _multistep_op_args(y_t, eps, coefs, noise, clip, past):
    """The positional arguments of torch.ops.sr3fast.reverse_step_multistep for `past`."""
    return (y_t, eps, coefs, past["x0_prev"], noise, clip, None, past.get("x0_prev2"))


# x0_prev's dtype besides y_t's own: float32 (read as is), and the other reduced type (converted)
OTHER_DTYPE = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float16,
               torch.float16: torch.bfloat16}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("depth", DEPTHS)
def test_opcheck_reverse_step_multistep(depth, channels_last, device):
    y_t, eps, coefs, noise, past = multistep_inputs(device, channels_last=channels_last,
                                                    depth=depth)
    op = torch.ops.sr3fast.reverse_step_multistep.default
    torch.library.opcheck(op, _multistep_op_args(y_t, eps, coefs, noise, 1.0, past))
    in_float = {name: t.float() for name, t in past.items()}  # histories in float32
    torch.library.opcheck(op, _multistep_op_args(y_t, eps, coefs, noise, None, in_float))
    # Drawn noise differs between calls, so only the checks that do not compare two runs' values.
    torch.library.opcheck(op, _multistep_op_args(y_t, eps, coefs, None, None, past),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clip", "clip"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("history", ["same", "float32", "other"])
@pytest.mark.parametrize("shape", [(3, 3, 9, 7), (2, 4, 16, 16), (1, 1, 1, 1), (2, 3, 96, 64)],
                         ids=["odd", "aligned", "1x1", "multi_task"])
@pytest.mark.parametrize("depth", DEPTHS)
def test_reverse_step_multistep_with_given_noise_is_exact(depth, shape, history, dtype,
                                                          channels_last, clip, device):
    """Same float32 operations in the same order as the contract, (((m0·x0 + m1·y) + m2·x0_prev)
    [+ m3·x0_prev2]) + sigma·z: y_prev and x0 equal bit for bit, in y_t's dtype and layout, to the
    formula written out here and (one history) to sr3fast.reference. Each sample has its own
    coefficients; multi_task spans several CPU tasks per sample (vector body and tail)."""
    x0_prev_dtype = {"same": dtype, "float32": torch.float32, "other": OTHER_DTYPE[dtype]}[history]
    y_t, eps, coefs, noise, past = multistep_inputs(device, dtype, shape, channels_last,
                                                    x0_prev_dtype=x0_prev_dtype, depth=depth)
    y_prev, x0 = reverse_step(y_t, eps, coefs, noise, clip, **past)
    want_y, want_x0 = _expected_multistep(y_t, eps, coefs, noise, clip, **past)
    report(f"reverse_step_multistep history {depth} y_prev", y_prev, want_y)
    for got, want in ((y_prev, want_y), (x0, want_x0)):
        assert got.dtype == dtype and got.stride() == y_t.stride()
        assert torch.equal(got, want)
    if depth == 1:
        want_y, want_x0 = reference.reverse_step(y_t, eps, coefs, noise, clip, **past)
        assert torch.equal(y_prev, want_y) and torch.equal(x0, want_x0)
    if y_t.numel() > 1:  # the deepest history term counts: without it the result is another one
        column = 4 + depth
        zeroed = coefs.clone()
        zeroed[:, column] = 0
        assert not torch.equal(reverse_step(y_t, eps, zeroed, noise, clip, **past)[0], y_prev)
    if clip is not None:  # the clamp was active for some elements, or the test proves nothing
        assert (x0.float().abs() == clip).any()


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_multistep_two_histories_in_their_places_and_order(device):
    """The bit-exact comparison above tells the contract from its near misses: m3 weighting
    x0_prev instead of x0_prev2, the histories swapped, or the same terms summed in another order
    (the history terms first, or FMA-like: all in float64 then rounded once). Each would end
    elsewhere for some element of a float32 step of this size."""
    y_t, eps, coefs, noise, past = multistep_inputs(device, shape=(2, 3, 96, 64), depth=2)
    got = reverse_step(y_t, eps, coefs, noise, 1.0, **past)[0]
    assert torch.equal(got, _expected_multistep(y_t, eps, coefs, noise, 1.0, **past)[0])
    x0_prev, x0_prev2 = past["x0_prev"], past["x0_prev2"]
    misplaced = _expected_multistep(y_t, eps, coefs, noise, 1.0, x0_prev, x0_prev)[0]
    swapped = _expected_multistep(y_t, eps, coefs, noise, 1.0, x0_prev2, x0_prev)[0]
    a, b, m0, m1, sigma, m2, m3 = coefs.reshape(2, 7, 1, 1, 1).unbind(dim=1)
    x0 = (a * y_t - b * eps).clamp(-1, 1)
    histories_first = (m0 * x0 + m1 * y_t) + (m2 * x0_prev + m3 * x0_prev2) + sigma * noise
    d = {name: t.double() for name, t in dict(a=a, b=b, m0=m0, m1=m1, sigma=sigma, m2=m2, m3=m3,
                                             x0=x0, y=y_t, h1=x0_prev, h2=x0_prev2,
                                             z=noise).items()}
    rounded_once = (d["m0"] * d["x0"] + d["m1"] * d["y"] + d["m2"] * d["h1"] + d["m3"] * d["h2"]
                    + d["sigma"] * d["z"]).float()
    for name, wrong in (("m3 on x0_prev", misplaced), ("swapped", swapped),
                        ("histories first", histories_first), ("rounded once", rounded_once)):
        assert not torch.equal(got, wrong), name
    # ... while the reorderings are the same update up to float32 rounding: each side's float32
    # products and partial sums (9 roundings at most) err by at most eps32/2 of a value bounded
    # by scale, the sum of the terms' magnitudes: |difference| <= 9 eps32 · scale.
    scale = (d["m0"] * d["x0"]).abs() + (d["m1"] * d["y"]).abs() + (d["m2"] * d["h1"]).abs() + \
        (d["m3"] * d["h2"]).abs() + (d["sigma"] * d["z"]).abs()
    bound = 9 * torch.finfo(torch.float32).eps * scale
    assert ((histories_first.double() - got.double()).abs() <= bound).all()
    assert ((rounded_once.double() - got.double()).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_reverse_step_multistep_mixed_dtypes_are_exact(depth, device):
    """bf16 y_t with float32 eps, noise and histories in every combination (separate kernels);
    the two histories always share a dtype."""
    y_t, eps, coefs, noise, past = multistep_inputs(device, torch.bfloat16, depth=depth)
    for e in (eps, eps.float()):
        for n in (noise, noise.float()):
            for h in (past, {name: t.float() for name, t in past.items()}):
                got = reverse_step(y_t, e, coefs, n, 1.0, **h)
                want = _expected_multistep(y_t, e, coefs, n, 1.0, **h)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clip", "clip"])
def test_reverse_step_multistep_with_m2_zero_is_the_single_step(clip, device):
    """m2 = 0: the history is not seen (whatever x0_prev holds) and y_prev is the single-step
    op's; x0 is the clamped estimate the single-step op used."""
    y_t, eps, coefs, noise, past = multistep_inputs(device)
    coefs[:, 5] = 0
    y_prev, x0 = reverse_step(y_t, eps, coefs, noise, clip, **past)
    assert torch.equal(y_prev, reverse_step(y_t, eps, coefs, noise, clip))
    a, b = coefs[:, 0].reshape(-1, 1, 1, 1), coefs[:, 1].reshape(-1, 1, 1, 1)
    estimate = a * y_t - b * eps
    assert torch.equal(x0, estimate if clip is None else estimate.clamp(-clip, clip))


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_multistep_with_m3_zero_is_one_history(device):
    """m3 = 0: x0_prev2 is not seen and the result is the one-history op's; and one history reads
    m2 from a (B, 6) table as from the (B, 7) one, m3 unread."""
    y_t, eps, coefs, noise, past = multistep_inputs(device, depth=2)
    one = reverse_step(y_t, eps, coefs, noise, 1.0, x0_prev=past["x0_prev"])
    assert torch.equal(reverse_step(y_t, eps, coefs[:, :6], noise, 1.0,
                                    x0_prev=past["x0_prev"])[0], one[0])
    coefs[:, 6] = 0
    two = reverse_step(y_t, eps, coefs, noise, 1.0, **past)
    assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[1])


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_takes_six_and_seven_column_coefs(device):
    """The single-step op reads columns 0..4 of a (B, 6) or (B, 7) table (m2, m3 unread), strided
    or not."""
    y_t, eps, coefs, noise, _ = multistep_inputs(device)
    want = reverse_step(y_t, eps, coefs[:, :5].contiguous(), noise, 1.0)
    for width in (6, 7):
        assert torch.equal(reverse_step(y_t, eps, coefs[:, :width].contiguous(), noise, 1.0), want)
        assert torch.equal(reverse_step(y_t, eps, coefs[:, :width], noise, 1.0), want)
    assert torch.equal(reverse_step(y_t, eps, coefs[:, :5], noise, 1.0), want)  # a strided view
    assert torch.equal(reference.reverse_step(y_t, eps, coefs[:, :6], noise, 1.0), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("depth", DEPTHS)
def test_reverse_step_multistep_draws_the_single_step_ops_noise(depth, channels_last, device):
    """Without noise, the ops draw the same z for the same generator state at every history depth
    (CPU: torch.randn's stream, like the reference; CUDA: the same Philox scheme). z is read off
    the single-step op with coefs (0, 0, 0, 0, 1), which returns it unchanged."""
    shape = (2, 3, 17, 9)  # odd: CUDA's element-wise path as well as the packed one below
    for size in (shape, (2, 4, 16, 16)):
        y_t, eps, coefs, _, past = multistep_inputs(device, shape=size,
                                                    channels_last=channels_last, depth=depth)
        unit = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]] * size[0], device=device)
        z = reverse_step(y_t, eps, unit, generator=torch.Generator(device).manual_seed(11))
        drawn = reverse_step(y_t, eps, coefs, None, 1.0,
                             generator=torch.Generator(device).manual_seed(11), **past)
        given = reverse_step(y_t, eps, coefs, z, 1.0, **past)
        assert torch.equal(drawn[0], given[0]) and torch.equal(drawn[1], given[1])
        assert z.std() > 0.5  # z is noise, not zeros
        other = reverse_step(y_t, eps, coefs, None, 1.0,
                             generator=torch.Generator(device).manual_seed(12), **past)
        assert not torch.equal(other[0], drawn[0]) and torch.equal(other[1], drawn[1])


def test_reverse_step_multistep_cpu_draws_noise_like_the_reference():
    y_t, eps, coefs, _, past = multistep_inputs("cpu", channels_last=True)
    got = reverse_step(y_t, eps, coefs, None, 1.0, torch.Generator().manual_seed(7), **past)
    want = reference.reverse_step(y_t, eps, coefs, None, 1.0, torch.Generator().manual_seed(7),
                                  **past)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_multistep_errors_say_what_is_wrong(device):
    y_t, eps, coefs, noise, past = multistep_inputs(device, depth=2)
    x0_prev, x0_prev2 = past["x0_prev"], past["x0_prev2"]
    op = torch.ops.sr3fast.reverse_step_multistep
    with pytest.raises(RuntimeError, match=r"reverse_step_multistep: coefs must be a float32 "
                                           r"tensor of shape \(3, 6\) or \(3, 7\) holding "
                                           r"\(a, b, m0, m1, sigma, m2\[, m3\]\)"):
        op(y_t, eps, coefs[:, :5], x0_prev)
    with pytest.raises(RuntimeError, match=r"reverse_step_multistep: coefs must be a float32 "
                                           r"tensor of shape \(3, 7\) holding "
                                           r"\(a, b, m0, m1, sigma, m2, m3\).*the second history "
                                           r"x0_prev2 is weighted by m3, the 7th column"):
        op(y_t, eps, coefs[:, :6], x0_prev, x0_prev2=x0_prev2)
    with pytest.raises(RuntimeError, match=r"coefs must be a float32 tensor of shape \(3, 5\), "
                                           r"\(3, 6\) or \(3, 7\)"):
        torch.ops.sr3fast.reverse_step(y_t, eps, torch.zeros(3, 8, device=device))
    with pytest.raises(RuntimeError, match=r"coefs must be a float32 tensor of shape \(3, 6\) or "
                                           r"\(3, 7\)"):
        op(y_t, eps, torch.zeros(3, 8, device=device), x0_prev)
    with pytest.raises(RuntimeError, match="reverse_step_multistep: x0_prev must match y_t"):
        op(y_t, eps, coefs, x0_prev[:1])
    with pytest.raises(RuntimeError, match="reverse_step_multistep: x0_prev2 must match y_t"):
        op(y_t, eps, coefs, x0_prev, x0_prev2=x0_prev2[:1])
    with pytest.raises(RuntimeError, match="x0_prev must be floating point"):
        op(y_t, eps, coefs, x0_prev.to(torch.int32))
    with pytest.raises(RuntimeError, match=r"x0_prev2 must have x0_prev's dtype, got BFloat16 and "
                                           r"Float; convert one of them"):
        op(y_t, eps, coefs, x0_prev, x0_prev2=x0_prev2.bfloat16())
    with pytest.raises(RuntimeError, match="reverse_step_multistep: clip must be positive"):
        op(y_t, eps, coefs, x0_prev, noise, -1.0)
    with pytest.raises(ValueError, match="x0_prev2 .* needs x0_prev"):
        reverse_step(y_t, eps, coefs, noise, x0_prev2=x0_prev2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_reverse_step_multistep_empty_batch(depth, device):
    y_t, eps, coefs, noise, past = multistep_inputs(device, shape=(2, 3, 0, 4), depth=depth)
    y_prev, x0 = reverse_step(y_t, eps, coefs, noise, 1.0, **past)
    assert y_prev.shape == x0.shape == y_t.shape


# ---- dispatch ----------------------------------------------------------------------------------

def test_auto_backend_runs_the_cpu_extension_for_cpu_tensors():
    with sr3fast.backend("auto"):
        assert backends.resolve("groupnorm_silu", "cpu") == "cpu"
        assert backends.resolve("reverse_step", "cpu") == "cpu"
        assert "groupnorm_silu  -> cpu" in sr3fast.explain_backend("cpu")
        inputs, _ = make_inputs("odd_hw", "all", "cpu")
        args = (inputs["x"], inputs["num_groups"], inputs["weight"], inputs["bias"], 1e-5,
                inputs["shift"], True)
        assert torch.equal(sr3fast.ops.groupnorm_silu(*args), groupnorm_silu(*args))
        y_t, eps, coefs, noise = step_inputs("cpu")
        assert torch.equal(sr3fast.ops.reverse_step(y_t, eps, coefs, noise),
                           reverse_step(y_t, eps, coefs, noise))


# ---- the C++ loop with Python denoisers (sr3fast._C.sample) -------------------------------------

def _stand_in_denoiser(x, y_t, gamma):
    """A deterministic f(x, y_t, gamma) -> eps whose output depends on the trajectory (y_t), so a
    loop that carried the wrong history or skipped a step ends elsewhere."""
    return (x - 0.7 * y_t).tanh() * gamma.sqrt()[:, None, None, None] + 0.1 * y_t


def _loop_tables(sampler, batch=2, steps=7, device="cpu"):
    from sr3fast.diffusion import NoiseSchedule, make_betas, noise_levels, respace, reverse_coefficients
    schedule = respace(NoiseSchedule(make_betas("linear", 200, 1e-4, 2e-2)), steps)
    return (reverse_coefficients(schedule, sampler, batch, device),
            noise_levels(schedule, batch, device))


def _random_multistep_tables(batch=3, steps=6, seed=4, device="cpu"):
    """(T, B, 7) coefficients different per sample and step in SR3's ranges, m2 in [-1, 0] and m3
    in [0, 1], as the 3M tables have them: m2 = 0 at the first step, m3 = 0 at the first two
    (no history yet), sigma = 0 at the last; and (T, B) noise levels."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    hi = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5, 0.0, 1.0])
    coefs = lo + (hi - lo) * torch.rand(steps, batch, 7, generator=g)
    coefs[0, :, 5] = 0
    coefs[:2, :, 6] = 0
    coefs[-1, :, 4] = 0
    return coefs.to(device), torch.rand(steps, batch, generator=g).to(device)


def _python_multistep_loop(denoise, x, y_T, coefs, gammas, clip, stochastic, generator, history,
                           mistake=None):
    """The multistep loop written out over the contract's formula (_expected_multistep):
    x0_prev = x0_prev2 = 0, then each step y, x0 = step(y, eps, coefs[i], z, clip, x0_prev
    [, x0_prev2]) and the histories shift back one step; z ~ N(0, I) from generator (zeros on the
    last step and when not stochastic). mistake: "no_shift" keeps x0_prev2 at zeros, "m3_on_x0_prev"
    weights x0_prev by m3 too: loops a test must tell from the right one."""
    y = y_T.float().clone()
    x0_prev = x0_prev2 = torch.zeros_like(y)
    steps = coefs.shape[0]
    for i in range(steps):
        eps = denoise(x, y.to(x.dtype), gammas[i])
        if stochastic and i < steps - 1:
            z = torch.randn(y.shape, generator=generator, device=y.device, dtype=torch.float32)
        else:
            z = torch.zeros_like(y)
        older = None
        if history == 2:
            older = x0_prev if mistake == "m3_on_x0_prev" else x0_prev2
        y, x0 = _expected_multistep(y, eps.float(), coefs[i], z, clip, x0_prev, older)
        if mistake != "no_shift":
            x0_prev2 = x0_prev
        x0_prev = x0
    return y


def _cpp_loop(x, y_T, coefs, gammas, clip, stochastic, kernel_noise, seed, history,
              callback=None):
    generator = torch.Generator(x.device).manual_seed(seed)
    return sr3fast._C.sample(_stand_in_denoiser, x, y_T, coefs, gammas, clip, stochastic,
                             kernel_noise, generator, callback, history)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tables", ["dpmpp_2m", "dpmpp_2m_sde", "random1", "random2"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clip", "clip"])
def test_cpp_loop_multistep_matches_a_written_out_python_loop(clip, tables, device):
    """history 1 or 2: x0 carried from step to step from zeros, each step the multistep op with
    the histories shifting back; with noise="torch" the Python loop over the contract's formula
    with the same tables, generator and stand-in denoiser gives the same y_0 bit for bit. On a
    CPU the in-kernel noise (drawn like the reference) agrees too. The loop's mistakes (the
    history not shifted, x0_prev weighted by m3) end elsewhere."""
    gen = torch.Generator().manual_seed(9)
    x = (torch.rand(3, 3, 6, 5, generator=gen) * 2 - 1).to(device)
    y_T = torch.randn(x.shape, generator=gen).to(device)
    if tables.startswith("random"):
        history = int(tables[-1])
        coefs, gammas = _random_multistep_tables(batch=3, device=device)
    else:
        history = 1
        coefs, gammas = _loop_tables(tables, batch=3, device=device)
    stochastic = bool((coefs[:, :, 4] != 0).any())
    assert (coefs[1:, :, 5] != 0).any()  # a multistep table: the history term is used
    steps = []
    got = _cpp_loop(x, y_T, coefs, gammas, clip, stochastic, False, 5, history,
                    callback=lambda i, y: steps.append(i))

    def python_loop(history, mistake=None):
        return _python_multistep_loop(_stand_in_denoiser, x, y_T, coefs, gammas, clip, stochastic,
                                      torch.Generator(device).manual_seed(5), history, mistake)

    want = python_loop(history)
    report(f"cpp multistep loop {tables}", got, want)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert steps == list(range(coefs.shape[0]))
    if device == "cpu":
        assert torch.equal(_cpp_loop(x, y_T, coefs, gammas, clip, stochastic, True, 5, history),
                           want)
    # every history matters: one fewer ends elsewhere, and so do the loop's possible mistakes
    assert not torch.equal(_cpp_loop(x, y_T, coefs, gammas, clip, stochastic, False, 5,
                                     history - 1), got)
    if history == 2:
        for mistake in ("no_shift", "m3_on_x0_prev"):
            assert not torch.equal(python_loop(2, mistake), got), mistake


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel_noise", [False, True], ids=["torch_noise", "kernel_noise"])
def test_cpp_loop_with_zero_history_columns_is_the_shallower_loop(kernel_noise, device):
    """All m2 = 0: history 1 gives history 0's y_0 bit for bit (same noise draws, the history term
    adds nothing), with either noise source; all m3 = 0: history 2 gives history 1's. And the
    loops read the older narrower tables as their 7-column form where they do not reach the
    missing columns."""
    gen = torch.Generator().manual_seed(10)
    x = (torch.rand(2, 3, 7, 4, generator=gen) * 2 - 1).to(device)
    y_T = torch.randn(x.shape, generator=gen).to(device)
    coefs, gammas = _random_multistep_tables(batch=2, steps=7, device=device)

    def loop(table, history):
        return _cpp_loop(x, y_T, table.contiguous(), gammas, 1.0, True, kernel_noise, 3, history)

    no_m3 = torch.cat([coefs[..., :6], torch.zeros_like(coefs[..., 6:])], dim=-1)
    one = loop(coefs, 1)
    assert torch.equal(loop(no_m3, 2), one)
    assert torch.equal(loop(coefs[..., :6], 1), one)
    no_m2 = torch.cat([coefs[..., :5], torch.zeros_like(coefs[..., 5:])], dim=-1)
    single = loop(coefs, 0)
    assert torch.equal(loop(no_m2, 1), single)
    assert torch.equal(loop(coefs[..., :5], 0), single)
    assert torch.equal(loop(coefs[..., :6], 0), single)


def test_cpp_loop_needs_the_columns_its_history_reads():
    x = torch.zeros(2, 3, 4, 4)
    coefs, gammas = _random_multistep_tables(batch=2)
    with pytest.raises(RuntimeError, match=r"coefs must be the \(T, 2, 7\) float32 table.*"
                                           r"a loop with history 1 reads its m2 column"):
        _cpp_loop(x, x, coefs[..., :5].contiguous(), gammas, None, False, False, 0, 1)
    with pytest.raises(RuntimeError, match=r"coefs must be the \(T, 2, 7\) float32 table.*"
                                           r"a loop with history 2 reads its m2 and m3 columns"):
        _cpp_loop(x, x, coefs[..., :6].contiguous(), gammas, None, False, False, 0, 2)
    with pytest.raises(RuntimeError, match=r"coefs must be the \(T, 2, 7\) float32 table"):
        _cpp_loop(x, x, coefs[..., :4].contiguous(), gammas, None, False, False, 0, 0)
    with pytest.raises(RuntimeError, match=r"history must be 0 \(single-step samplers\), 1 "
                                           r"\(DPM-Solver\+\+ 2M\) or 2 \(3M\).*got 3"):
        _cpp_loop(x, x, coefs, gammas, None, False, False, 0, 3)


def test_cpp_loop_history_defaults_to_none():
    """Callers from before the history option (ten arguments) run the single-step loop; the
    keyword is `history`."""
    gen = torch.Generator().manual_seed(12)
    x = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1
    coefs, gammas = _random_multistep_tables(batch=2)
    old = sr3fast._C.sample(_stand_in_denoiser, x, x, coefs, gammas, None, False, False, None, None)
    assert torch.equal(old, _cpp_loop(x, x, coefs, gammas, None, False, False, 0, 0))
    two = sr3fast._C.sample(_stand_in_denoiser, x, x, coefs, gammas, None, False, False, None,
                            None, history=2)
    assert torch.equal(two, _cpp_loop(x, x, coefs, gammas, None, False, False, 0, 2))


def test_save_sampling_inputs_records_history(tmp_path):
    """What csrc/tools/sample.cpp reads: a 0-d int64 "history" (sr3fast.diffusion's HISTORY,
    0 for single-step samplers), the 0-d bool "multistep" (history > 0) that programs from before
    it read, the coefficient table, and "stochastic" as the samplers decide it."""
    from sr3fast.diffusion import NoiseSchedule, make_betas, respace
    from sr3fast.diffusion.coefficients import HISTORY, SAMPLER_NAMES, is_stochastic
    from sr3fast.export import save_sampling_inputs
    schedule = respace(NoiseSchedule(make_betas("linear", 100, 1e-4, 2e-2)), 5)
    x = torch.zeros(1, 3, 4, 4)
    assert HISTORY["dpmpp_2m"] == HISTORY["dpmpp_2m_sde"] == 1 and "posterior" not in HISTORY
    for sampler in SAMPLER_NAMES:
        record = torch.load(save_sampling_inputs(tmp_path / f"{sampler}.pt", x, schedule, sampler))
        history = HISTORY.get(sampler, 0)
        assert record["history"].dtype == torch.int64 and record["history"].dim() == 0
        assert record["history"].item() == history
        assert record["multistep"].dtype == torch.bool and record["multistep"].dim() == 0
        assert record["multistep"].item() == (history > 0)
        assert record["stochastic"].item() == is_stochastic(schedule, sampler)
        assert record["coefs"].shape[:2] == (5, 1) and record["coefs"].shape[2] >= 5 + history


# ---- the CMake build ---------------------------------------------------------------------------

# pip's cmake, ctest and ninja (the test extras, scripts/setup.sh) install beside the interpreter,
# which is not on PATH when the venv's python is run without activating it.
BUILD_TOOLS_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _cuda_toolkit() -> str | None:
    """The CUDA toolkit root, found as setup.py finds it (nvcc on PATH may be a wrapper script
    outside the toolkit): CUDA_HOME / CUDA_PATH, then the standard install locations."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    for home in ("/usr/local/cuda", "/opt/cuda"):
        if (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home).resolve())
    return None


CMAKE_BUILDS = [
    pytest.param(False, id="cpu"),
    # SR3FAST_WITH_CUDA=ON: the .cu sources too; the C++ test then checks the CUDA kernels as well
    pytest.param(True, id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not (torch.cuda.is_available() and torch.version.cuda and _cuda_toolkit()),
        reason="a CUDA build needs a GPU, a CUDA build of torch and a CUDA toolkit (CUDA_HOME)")]),
]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake", path=BUILD_TOOLS_PATH) is None,
                    reason="cmake is not installed")
@pytest.mark.parametrize("with_cuda", CMAKE_BUILDS)
def test_cmake_build_and_ctest(tmp_path, with_cuda):
    """CMakeLists.txt builds the same sources (CPU only by default, also the CUDA kernels with
    SR3FAST_WITH_CUDA=ON), its C++ test passes under CTest, and so does sr3fast_sample on the tiny
    preset (csrc/tests/sample_tiny.py, run with this interpreter).

    A CPU build on a machine with CUDA: torch's CMake config, from a CUDA build of torch, looks
    for the toolkit even so (CMakeLists.txt points it at CUDA_HOME), and the library then links
    no CUDA, so its C++ test checks the CPU kernels only, as on a machine without a GPU."""
    generator = ["-G", "Ninja"] if shutil.which("ninja", path=BUILD_TOOLS_PATH) else []
    env = dict(os.environ, PATH=BUILD_TOOLS_PATH,
               CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
    cuda = []
    if with_cuda:
        home = _cuda_toolkit()
        major, minor = torch.cuda.get_device_capability()
        env.update(CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}")  # this GPU only: faster
        cuda = ["-DSR3FAST_WITH_CUDA=ON", f"-DCUDA_TOOLKIT_ROOT_DIR={home}",
                f"-DCMAKE_CUDA_COMPILER={home}/bin/nvcc"]
    commands = [
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), *generator, "-DCMAKE_BUILD_TYPE=Release",
         f"-DPython_EXECUTABLE={sys.executable}", *cuda],
        ["cmake", "--build", str(tmp_path)],
        ["ctest", "--test-dir", str(tmp_path), "--output-on-failure"],
    ]
    for command in commands:
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        print(result.stdout[-4000:], result.stderr[-4000:])
        assert result.returncode == 0, f"{' '.join(command)} failed"
    # CTest registers the sample test only when CMake finds a Python; it must have run here.
    for test in ("sr3fast_ops", "sr3fast_sample_tiny"):
        assert re.search(rf"Test +#\d+: {test} \.+ +Passed", result.stdout), f"{test} did not run"
    # Which devices the C++ test checked: the CUDA kernels exactly when they were built.
    ops_test = subprocess.run([str(tmp_path / "sr3fast_ops_test")], env=env, capture_output=True,
                              text=True)
    print(ops_test.stdout[-4000:])
    assert ops_test.returncode == 0 and "reverse_step cpu (exact)" in ops_test.stdout
    assert ("reverse_step cuda (exact)" in ops_test.stdout) == with_cuda


# ---- the sampling loop in C++ ------------------------------------------------------------------

class TinyDenoiser(torch.nn.Module):
    """A stand-in for the U-Net with the same interface: predict_noise(x, y_t, gamma) -> eps."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 3, 3, padding=1)

    def predict_noise(self, x, y_t, gamma):
        return self.conv(torch.cat([x, y_t], dim=1)) * gamma.sqrt()[:, None, None, None]


@pytest.fixture(scope="module")
def aoti_denoiser(tmp_path_factory):
    """(package path, x, the loaded package as a model) for a tiny denoiser compiled on CPU."""
    from sr3fast.export import export_denoiser
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    path = str(export_denoiser(TinyDenoiser().eval(), x, tmp_path_factory.mktemp("aoti") / "d.pt2"))
    loaded = torch._inductor.aoti_load_package(path)

    class Loaded:
        def predict_noise(self, cond, y_t, gamma):
            return loaded(cond, y_t, gamma)

    return path, x, Loaded()


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["sr3", "posterior", "ddim", "dpmpp_2m", "dpmpp_2m_sde",
                                     "dpmpp_3m", "dpmpp_3m_sde"])
def test_sample_aoti_matches_the_python_sampler(aoti_denoiser, sampler):
    """The C++ loop with the compiled denoiser reproduces sr3fast.diffusion's sampler exactly
    (same tables, same noise draws, same fused step, the same x0 histories for multistep ones)."""
    from sr3fast.diffusion import (CLIP, SAMPLERS, NoiseSchedule, make_betas, noise_levels,
                                   reverse_coefficients)
    from sr3fast.diffusion.coefficients import HISTORY, is_stochastic
    from sr3fast.ops.extension.sampler import sample_aoti
    path, x, model = aoti_denoiser
    schedule = NoiseSchedule(make_betas("linear", 12, 1e-4, 2e-2))
    coefs = reverse_coefficients(schedule, sampler, x.shape[0], x.device)
    gammas = noise_levels(schedule, x.shape[0], x.device)
    y_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    want = SAMPLERS[sampler](model, x, schedule, y_T=y_T,
                             generator=torch.Generator().manual_seed(3))
    options = dict(clip=CLIP[sampler], stochastic=is_stochastic(schedule, sampler),
                   history=HISTORY.get(sampler, 0))
    got = sample_aoti(path, x, y_T, coefs, gammas, generator=torch.Generator().manual_seed(3),
                      **options)
    report(f"sample_aoti {sampler}", got, want)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # On CPU the kernel draws z exactly as the loop does, so both noise sources agree.
    kernel = sample_aoti(path, x, y_T, coefs, gammas, noise="kernel",
                         generator=torch.Generator().manual_seed(3), **options)
    assert torch.equal(kernel, want)


@pytest.mark.slow
def test_sample_aoti_registration_and_errors(aoti_denoiser):
    import sr3fast.ops.extension.sampler  # noqa: F401  registers the op's fake kernel (run alone, too)
    path, x, _ = aoti_denoiser
    coefs = torch.rand(4, 2, 5)
    gammas = torch.rand(4, 2)
    torch.library.opcheck(torch.ops.sr3fast.sample_aoti.default, (path, x, x, coefs, gammas),
                          test_utils=("test_schema", "test_faketensor"))
    for history in (1, 2):
        wide = torch.cat([coefs, torch.zeros(4, 2, history)], dim=2)
        torch.library.opcheck(torch.ops.sr3fast.sample_aoti.default, (path, x, x, wide, gammas),
                              {"history": history}, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="a loop with history 1 reads its m2 column"):
        torch.ops.sr3fast.sample_aoti(path, x, x, coefs, gammas, history=1)
    with pytest.raises(ValueError, match="history must be 0, 1 or 2"):
        sr3fast.ops.extension.sampler.sample_aoti(path, x, x, coefs, gammas, history=True)
    with pytest.raises(RuntimeError, match=r"gammas must be the \(T, 2\) float32 table"):
        torch.ops.sr3fast.sample_aoti(path, x, x, coefs, gammas[:3])
