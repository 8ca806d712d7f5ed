"""conv2d: the U-Net's convolutions through the backends. The CPU backend's prepacked oneDNN
op (sr3fast::conv2d, csrc/conv2d/cpu.cpp) against the reference F.conv2d at SR3's shapes, its
registration (opcheck), its weight cache under in-place updates and freed parameters, and its
fallback under autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sr3fast
from sr3fast import backends, ops, reference

from support import fast_backend_params, fp32_atol, report

CPU_REASON = backends.unavailable_reason("cpu", "cpu")
needs_cpu_backend = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend: {CPU_REASON}")

# (batch, in, out, size, kernel, stride): SR3's convolutions, from the first (6 channels in)
# through the 3x3 stride-2 downsampler and the 1x1 attention/residual projections to the last
# (3 channels out), plus odd sizes and batch 3.
CASES = {
    "input-6to64-128px": (1, 6, 64, 128, 3, 1),
    "block-64to64-128px": (1, 64, 64, 128, 3, 1),
    "block-128to256-32px": (2, 128, 256, 32, 3, 1),
    "down-stride2-128-64px": (1, 128, 128, 64, 3, 2),
    "qkv-1x1-512to1536-16px": (1, 512, 1536, 16, 1, 1),
    "out-64to3-128px": (1, 64, 3, 128, 3, 1),
    "odd-13px-batch3": (3, 32, 48, 13, 3, 1),
    "1x1-spatial": (2, 16, 16, 1, 3, 1),
}


def _inputs(batch, cin, cout, size, kernel, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, size, size, generator=generator)
    weight = torch.randn(cout, cin, kernel, kernel, generator=generator) / (cin * kernel * kernel) ** 0.5
    bias = torch.randn(cout, generator=generator)
    return x, weight, bias


def _atol(cin, kernel, x, weight):
    # fp32, only the summation order of each C*k*k dot product differs
    return fp32_atol(cin * kernel * kernel, (x.abs().max() * weight.abs().max()).item())


@pytest.mark.parametrize("backend", fast_backend_params("conv2d"))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_conv2d_matches_reference(backend, case):
    batch, cin, cout, size, kernel, stride = CASES[case]
    x, weight, bias = _inputs(batch, cin, cout, size, kernel)
    padding = kernel // 2
    with torch.no_grad():
        want = reference.conv2d(x, weight, bias, (stride, stride), (padding, padding))
        with sr3fast.backend(backend):
            got = ops.conv2d(x, weight, bias, (stride, stride), (padding, padding))
            no_bias = ops.conv2d(x, weight, None, (stride, stride), (padding, padding))
    assert got.shape == want.shape
    max_err, _ = report(f"conv2d {case} on {backend}", got, want)
    assert max_err <= _atol(cin, kernel, x, weight)
    report(f"conv2d {case} no bias", no_bias, want - bias[:, None, None])
    assert (no_bias - (want - bias[:, None, None])).abs().max() <= 2 * _atol(cin, kernel, x, weight)


@needs_cpu_backend
def test_cpu_conv2d_runs_channels_last_and_reads_either_layout():
    x, weight, bias = _inputs(1, 32, 32, 16, 3)
    with torch.no_grad(), sr3fast.backend("cpu"):
        plain = ops.conv2d(x, weight, bias, (1, 1), (1, 1))
        last = ops.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, (1, 1), (1, 1))
    assert plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, last)


@needs_cpu_backend
def test_cpu_conv2d_sees_in_place_weight_updates():
    """The prepacked weight is rebuilt when the parameter changes (an optimizer step, a load):
    after each change the result is checked against F.conv2d of the new weight."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 12, 12)

    def checked() -> torch.Tensor:
        with torch.no_grad():
            with sr3fast.backend("cpu"):
                got = ops.conv2d(x, conv.weight, conv.bias, (1, 1), (1, 1))
            want = F.conv2d(x, conv.weight, conv.bias, padding=1)
        assert (got - want).abs().max() <= _atol(8, 3, x, conv.weight)
        return got

    first = checked()
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    second = checked()
    conv.load_state_dict({"weight": torch.ones(8, 8, 3, 3), "bias": torch.zeros(8)})
    third = checked()
    assert not torch.allclose(first, second) and not torch.allclose(second, third)


@needs_cpu_backend
def test_cpu_conv2d_trains_through_autograd():
    """When autograd records the call, the CPU backend is F.conv2d: the same gradients."""
    x, weight, bias = _inputs(2, 16, 8, 9, 3)
    grads = {}
    for name in ("reference", "cpu"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with sr3fast.backend(name):
            ops.conv2d(*leaves, (1, 1), (1, 1)).square().sum().backward()
        grads[name] = [leaf.grad for leaf in leaves]
    for got, want in zip(grads["cpu"], grads["reference"]):
        assert torch.equal(got, want)


@needs_cpu_backend
def test_cpu_conv2d_compiles_without_graph_breaks():
    x, weight, bias = _inputs(1, 8, 8, 10, 3)
    with torch.no_grad(), sr3fast.backend("cpu"):
        eager = ops.conv2d(x, weight, bias, (1, 1), (1, 1))
        compiled = torch.compile(lambda *a: ops.conv2d(*a, (1, 1), (1, 1)), fullgraph=True, backend="eager")
        got = compiled(x, weight, bias)
    assert (got - eager).abs().max() <= _atol(8, 3, x, weight)


@needs_cpu_backend
@pytest.mark.parametrize("case", ["block-64to64-128px", "down-stride2-128-64px", "odd-13px-batch3"])
def test_cpu_conv2d_op_registration(case):
    batch, cin, cout, size, kernel, stride = CASES[case]
    x, weight, bias = _inputs(batch, cin, cout, min(size, 16), kernel)
    padding = kernel // 2
    for b in (bias, None):
        torch.library.opcheck(torch.ops.sr3fast.conv2d.default,
                              (x, weight, b, [stride, stride], [padding, padding]))


@needs_cpu_backend
def test_cpu_conv2d_cache_follows_parameter_lifetimes():
    """Packed weights of freed parameters are dropped, and a new parameter that reuses the
    memory of a freed one is never served the old packing."""
    x = torch.randn(1, 8, 10, 10)
    for scale in (1.0, -3.0, 0.5):  # each conv frees the last; the allocator may reuse its memory
        conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            conv.weight.mul_(scale)
            with sr3fast.backend("cpu"):
                got = ops.conv2d(x, conv.weight, conv.bias, (1, 1), (1, 1))
            want = F.conv2d(x, conv.weight, conv.bias, padding=1)
        assert (got - want).abs().max() <= _atol(8, 3, x, conv.weight)
        del conv


@needs_cpu_backend
def test_only_the_cpu_backend_claims_conv2d():
    """The cuda backend shares the cpu backend's package but not its conv2d (cuDNN is best)."""
    assert backends.implements("cpu", "conv2d") and backends.implements("reference", "conv2d")
    assert not backends.implements("cuda", "conv2d") and not backends.implements("triton", "conv2d")
