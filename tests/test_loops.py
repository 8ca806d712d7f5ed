"""The sampling loops (sr3fast.diffusion.loops): loop="cpp" and loop="graph" reproduce
loop="python"; packages from `sr3fast export` run in them; every misuse says what to do.

What "reproduce" can mean depends on which reverse_step kernel each loop runs:

  loop="python", "graph"  `ops.reverse_step` of the selected backend (auto: the extension's CPU
                          kernel on a CPU, the Triton kernel on CUDA);
  loop="cpp"              always the extension's kernel (sr3fast::reverse_step through the
                          dispatcher), whatever backend is selected.

Noise. With noise="torch" every loop draws y_T and each z with torch.randn from the one generator
in the same order, so all loops see the same noise whatever kernel they run. With noise="kernel"
z is drawn inside the kernel: the extension's stream (CPU: torch's own normal draws; CUDA: curand
Philox at the generator's offset) and the Triton kernel's (Philox keyed by a torch.randint draw)
are different streams, so on CUDA loop="cpp" and a Python loop on the triton backend give two
different, equally valid samples. No tolerance can compare those; they are compared only where
both loops run the same kernel.

Arithmetic. The extension's kernels round every operation on its own in the reference's order
(bit-identical to sr3fast.reference, CPU and CUDA). The Triton kernel on a GPU is compiled with
FMA contraction, so it rounds a*y - b*eps and m0*x0 + m1*y + sigma*z differently, by a few ulps.

Hence:
  - same kernel, same noise -> bit for bit: the Python loop on the extension's backend
    (`EXTENSION`, = what auto picks on a CPU) against loop="cpp", both noise sources; the graph
    loop against the Python loop (same backend: the very kernels the Python loop launches);
  - different kernels (auto on CUDA: Triton against the extension) -> step by step: each step of
    the C++ loop against the Python loop's reverse_step applied to the same state, eps and z,
    within a rounding bound derived below (`reverse_step_rounding_bound`). Whole trajectories are
    not compared with a tolerance: a one-ulp change of y_t changes eps = f(x, y_t, g) by the
    U-Net's own float32 rounding at two different inputs (independent errors of many ulps), which
    the next step multiplies by m0*b; a bound would have to model the network.

Eager against package (an AOTInductor-compiled U-Net): different code for the same maths, so a
tolerance, derived in `test_package_computes_the_models_noise_prediction`, with TF32 off on both
sides (`fp32_only`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sr3fast
from sr3fast import backends, reference
from sr3fast.cli import main as cli_main
from sr3fast.diffusion import CLIP, LOOPS, NoiseSchedule, respace, reverse_coefficients, sample
from sr3fast.diffusion.coefficients import HISTORY, is_stochastic
from sr3fast.export import Package, PackageInfo, load_package, open_package

from support import DEVICE, fp32_atol, report

STEPS = 6
HAS_EXTENSION = importlib.util.find_spec("sr3fast._C") is not None
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension sr3fast._C is not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="loop='graph' needs a CUDA device")
# The backend whose reverse_step the C++ loop runs on DEVICE: the extension's kernels for it.
EXTENSION = DEVICE.type
_CPP_LOOP_REASON = backends.unavailable_reason(EXTENSION, DEVICE.type)
# loop='cpp' on DEVICE: the extension, with reverse_step kernels for DEVICE (a CUDA run needs a
# CUDA build of sr3fast._C; a CPU-only build has no CUDA kernel for the C++ loop to call).
needs_cpp_loop = pytest.mark.skipif(_CPP_LOOP_REASON is not None,
                                    reason=f"loop='cpp' cannot run on {DEVICE}: {_CPP_LOOP_REASON}")
SAMPLER_CASES = [("sr3", {}), ("posterior", {}), ("ddim", {}), ("ddim", {"eta": 0.5}),
                 ("dpmpp_2m", {}), ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"eta": 0.5}),
                 ("dpmpp_3m", {}), ("dpmpp_3m_sde", {})]
CASE_IDS = ["sr3", "posterior", "ddim", "ddim-eta0.5", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde-eta0.5",
            "dpmpp_3m", "dpmpp_3m_sde"]


@contextlib.contextmanager
def fp32_only():
    """Convolutions and matmuls in full float32 inside the block (restored after).

    cuDNN convolutions default to TF32 on Ampere and later (torch.backends.cudnn.allow_tf32 =
    True), cuBLAS matmuls may (torch.backends.cuda.matmul.allow_tf32). A package runs its
    convolutions and matmuls through the same libraries under the same process-wide switches, but
    inductor may choose other algorithms and layouts (channels-last convolutions, say), so with
    TF32 eager and package would differ by TF32's rounding: unit roundoff 2^-11 per product
    instead of float32's 2^-24, about 1e-3 relative after the U-Net's K = 9*C-term sums. A
    tolerance that wide (8192 x float32's) would hide real defects, such as a wrong constant, so
    both sides run in float32 and keep float32's tolerance. No effect on a CPU.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = sr3fast.load("tiny").to(DEVICE).eval()
    schedule = respace(NoiseSchedule.from_config(model.config.schedule), STEPS)
    x = torch.rand(1, 3, 16, 16, device=DEVICE) * 2 - 1
    return model, schedule, x


@pytest.fixture(scope="module")
def package(tiny, tmp_path_factory):
    """The tiny model exported through the CLI (auto backend: sr3fast's ops compiled in)."""
    model, _, _ = tiny
    folder = tmp_path_factory.mktemp("package")
    checkpoint = sr3fast.save(model, folder / "tiny.safetensors")
    path = folder / "tiny.pt2"
    with fp32_only():
        assert cli_main(["export", str(checkpoint), "-o", str(path), "--device", DEVICE.type]) == 0
    return checkpoint, path


def _sample(tiny, sampler, kwargs, loop, seed=1, model=None, **more):
    default_model, schedule, x = tiny
    steps = []
    generator = torch.Generator(DEVICE).manual_seed(seed)
    y = sample(sampler, default_model if model is None else model, x, schedule,
               generator=generator, loop=loop,
               callback=lambda i, y: steps.append((i, y.clone())), **kwargs, **more)
    return y, steps


def _assert_same_run(name, got, want):
    (y_got, steps_got), (y_want, steps_want) = got, want
    report(name, y_got, y_want)
    assert [i for i, _ in steps_got] == list(range(STEPS)) == [i for i, _ in steps_want]
    for (i, a), (_, b) in zip(steps_got, steps_want):
        assert torch.equal(a, b), f"{name}: loop step {i} differs"
    assert torch.equal(y_got, y_want)


@needs_cpp_loop
@pytest.mark.parametrize("noise", ["torch", "kernel"])
@pytest.mark.parametrize("sampler,kwargs", SAMPLER_CASES, ids=CASE_IDS)
def test_cpp_loop_reproduces_the_python_loop(tiny, sampler, kwargs, noise):
    """Same kernel (the extension's reverse_step in both loops), same noise: bit for bit. On a CPU
    the extension is what auto picks anyway; on CUDA auto would pick Triton for the Python loop,
    which the per-step test below compares."""
    with sr3fast.backend(EXTENSION):
        _assert_same_run(f"cpp {sampler} {noise}", _sample(tiny, sampler, kwargs, "cpp", noise=noise),
                         _sample(tiny, sampler, kwargs, "python", noise=noise))


U32 = 2.0 ** -24  # float32 unit roundoff


def reverse_step_rounding_bound(y, eps, coefs, z, clip, x0_prev=None, prev_products=None,
                                x0_prev2=None, prev2_products=None):
    """Elementwise bound on |A - B| for two float32 evaluations A, B of one reverse step,

        x0 = clamp(a*y - b*eps),  y_prev = m0*x0 + m1*y + sigma*z  [+ m2*x0_prev, multistep],

    each rounding every operation once in this order, or contracting a product into the sum that
    consumes it (an FMA, which drops that product's rounding). Standard model, fl(p o q) =
    (p o q)(1 + d) with |d| <= u = 2^-24, and writing T = |a*y| + |b*eps|,
    P = |m0*x0| + |m1*y| + |sigma*z| (exact values):

        |x0^ - x0|          <= 3u*T                     (two products, one difference; clamp is
                                                         1-Lipschitz, so it does not enlarge it)
        |y_prev^ - y_prev|  <= |m0|*3u*T + 4u*P + O(u^2) (three products, two sums; and x0's error
                                                         carried by m0)

    The two evaluations are each within that of the exact value, so within twice it of each other;
    the factor 1.001 covers the O(u^2) terms. Plus 16 float32 denormal floors for CUDA's
    flush-to-zero (--use_fast_math), which may drop a denormal product that the other keeps.
    Computed in float64 from the float32 inputs, so the bound itself is exact enough.

    Multistep (x0_prev given): one more product and sum, so 5u*P with P + |m2*x0_prev|; and each
    evaluation carried its own x0_prev, within 3u*T_prev of the exact one (prev_products, the
    previous step's T), which m2 carries: + |m2|*3u*T_prev. A second history term (x0_prev2,
    3M) likewise: 6u*P with P + |m3*x0_prev2|, and + |m3|*3u*T_prev2 (prev2_products, the T of
    two steps back).

    Returns (bound, T), T for the next step's prev_products.
    """
    shape = (-1,) + (1,) * (y.dim() - 1)
    a, b, m0, m1, sigma = (coefs.double()[:, k].reshape(shape) for k in range(5))
    y, eps, z = y.double(), eps.double(), z.double()
    products = (a * y).abs() + (b * eps).abs()
    x0 = a * y - b * eps
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    terms = (m0 * x0).abs() + (m1 * y).abs() + (sigma * z).abs()
    if x0_prev is None:
        one = m0.abs() * 3 * U32 * products + 4 * U32 * terms
    else:
        m2 = coefs.double()[:, 5].reshape(shape)
        terms = terms + (m2 * x0_prev.double()).abs()
        carried = m2.abs() * 3 * U32 * prev_products
        sums = 5
        if x0_prev2 is not None:
            m3 = coefs.double()[:, 6].reshape(shape)
            terms = terms + (m3 * x0_prev2.double()).abs()
            carried = carried + m3.abs() * 3 * U32 * prev2_products
            sums = 6
        one = m0.abs() * 3 * U32 * products + sums * U32 * terms + carried
    return 2 * 1.001 * one + 16 * torch.finfo(torch.float32).tiny, products


@needs_cpp_loop
@pytest.mark.parametrize("sampler,kwargs", SAMPLER_CASES, ids=CASE_IDS)
def test_every_cpp_loop_step_is_the_python_loops_step(tiny, sampler, kwargs):
    """Under auto, loop="cpp" (the extension's kernel) against the reverse_step loop="python" runs
    (auto's: the same kernel on a CPU, Triton on CUDA), one step at a time: the denoiser records
    the state and eps the C++ loop gives it; the noise is drawn again from the same seed, as
    sr3fast.diffusion's samplers draw it (y_T, then one z per noisy step). Each C++ step must equal
    the Python loop's step from that state, eps and z, bit for bit where the kernels are the same,
    else within `reverse_step_rounding_bound`. Wrong noise (another stream, another order) would
    be off by sigma*z, far beyond the bound."""
    model, schedule, x = tiny
    calls = []

    def recording(cond, y_t, gamma):
        eps = model.predict_noise(cond, y_t, gamma)
        calls.append((y_t.clone(), eps.clone()))
        return eps

    with sr3fast.backend("auto"):
        python_kernel = backends.resolve("reverse_step", DEVICE.type)
        _, steps = _sample(tiny, sampler, kwargs, "cpp", model=SimpleNamespace(predict_noise=recording))
        assert len(calls) == len(steps) == STEPS
        generator = torch.Generator(DEVICE).manual_seed(1)
        state = torch.randn(x.shape, generator=generator, device=DEVICE)  # y_T
        coefs = reverse_coefficients(schedule, sampler, x.shape[0], DEVICE, **kwargs)
        stochastic = is_stochastic(schedule, sampler, kwargs.get("eta"))
        depth = HISTORY.get(sampler, 0)
        x0_prev, prev_products = torch.zeros_like(state), torch.zeros_like(state, dtype=torch.float64)
        x0_prev2, prev2_products = torch.zeros_like(state), torch.zeros_like(prev_products)
        second = {"x0_prev2": x0_prev2} if depth == 2 else {}
        clip = CLIP[sampler]
        worst = 0.0
        for i, ((y_t, eps), (_, y_prev)) in enumerate(zip(calls, steps)):
            assert torch.equal(y_t, state), f"step {i}: the denoiser did not get the loop's state"
            if stochastic and i < STEPS - 1:
                z = torch.randn(state.shape, generator=generator, device=DEVICE)
            else:
                z = torch.zeros_like(state)
            if depth:
                want, x0 = sr3fast.ops.reverse_step(y_t, eps.float(), coefs[i], noise=z, clip=clip,
                                                    x0_prev=x0_prev, **second)
            else:
                want = sr3fast.ops.reverse_step(y_t, eps.float(), coefs[i], noise=z, clip=clip)
            if python_kernel == EXTENSION:
                assert torch.equal(y_prev, want), f"step {i} differs ({python_kernel} kernel)"
            else:
                bound, products = reverse_step_rounding_bound(
                    y_t, eps, coefs[i], z, clip, x0_prev if depth else None, prev_products,
                    x0_prev2 if depth == 2 else None, prev2_products)
                prev2_products, prev_products = prev_products, products
                excess = ((y_prev.double() - want.double()).abs() / bound).max().item()
                worst = max(worst, excess)
                assert excess <= 1, (f"step {i}: C++ and {python_kernel} steps differ by "
                                     f"{excess:.2f}x the rounding bound")
            state = y_prev
            if depth:
                x0_prev2, x0_prev = x0_prev, x0
                second = {"x0_prev2": x0_prev2} if depth == 2 else {}
        print(f"{sampler}: python loop's kernel {python_kernel}; worst step difference "
              f"{worst:.3f} of the rounding bound")


def test_reverse_step_rounding_bound_covers_fused_multiply_adds():
    """The bound against the two extremes it must cover: every operation rounded (the reference)
    and every product contracted into its sum (FMA, emulated in float64 then rounded once), with
    values of many magnitudes and a clamp."""
    generator = torch.Generator().manual_seed(0)
    shape = (4, 3, 32, 32)
    y = torch.randn(shape, generator=generator) * 10.0 ** torch.randint(-3, 3, shape, generator=generator)
    eps, z = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    coefs = torch.rand(4, 5, generator=generator) * 3
    for clip in (None, 1.0):
        rounded = reference.reverse_step(y, eps, coefs, z, clip)
        a, b, m0, m1, sigma = (coefs[:, k].reshape(-1, 1, 1, 1) for k in range(5))
        fma = lambda p, q, r: (p.double() * q.double() + r.double()).float()  # noqa: E731
        x0 = fma(a, y, -(b * eps))
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        fused = fma(m0, x0, fma(m1, y, sigma * z))
        bound, _ = reverse_step_rounding_bound(y, eps, coefs, z, clip)
        ratio = ((fused.double() - rounded.double()).abs() / bound).max().item()
        print(f"clip={clip}: FMA against rounded: {ratio:.3f} of the bound")
        assert 0 < ratio <= 1  # they do differ (the test means something) and stay within


@pytest.mark.parametrize("depth", [1, 2], ids=["x0_prev", "x0_prev2"])
def test_multistep_rounding_bound_covers_fused_multiply_adds_and_a_drifted_history(depth):
    """The multistep bound: the reference's rounded step from one history against the FMA chain
    from a history off by 3u*T_prev (3u*T_prev2 for x0_prev2: the most the other evaluation's
    earlier steps can differ, sign chosen to add up), large m2 (and m3) so the history matters."""
    generator = torch.Generator().manual_seed(1)
    shape = (4, 3, 32, 32)
    y = torch.randn(shape, generator=generator) * 10.0 ** torch.randint(-3, 3, shape, generator=generator)
    eps, z = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    prev_products, prev2_products = ((torch.rand(shape, generator=generator) * 10).double()
                                     for _ in range(2))
    x0_prev, x0_prev2 = (torch.rand(shape, generator=generator) * 2 - 1 for _ in range(2))
    coefs = torch.rand(4, 7, generator=generator) * 3
    coefs[:, 5] *= -4
    coefs[:, 6] *= 2
    if depth == 1:
        coefs, x0_prev2, prev2_products = coefs[:, :6].contiguous(), None, None
    drift = (3 * U32 * prev_products).float()
    for clip in (None, 1.0):
        rounded, _ = reference.reverse_step(y, eps, coefs, z, clip, x0_prev=x0_prev, x0_prev2=x0_prev2)
        a, b, m0, m1, sigma, m2 = (coefs[:, k].reshape(-1, 1, 1, 1) for k in range(6))
        fma = lambda p, q, r: (p.double() * q.double() + r.double()).float()  # noqa: E731
        x0 = fma(a, y, -(b * eps))
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        tail = sigma * z
        if depth == 2:
            m3 = coefs[:, 6].reshape(-1, 1, 1, 1)
            tail = fma(m3, x0_prev2 + (3 * U32 * prev2_products).float(), tail)
        fused = fma(m0, x0, fma(m1, y, fma(m2, x0_prev + drift, tail)))
        bound, _ = reverse_step_rounding_bound(y, eps, coefs, z, clip, x0_prev, prev_products,
                                               x0_prev2, prev2_products)
        ratio = ((fused.double() - rounded.double()).abs() / bound).max().item()
        single, _ = reverse_step_rounding_bound(y, eps, coefs[:, :5], z, clip)
        beyond_single = ((fused.double() - rounded.double()).abs() / single).max().item()
        print(f"depth {depth} clip={clip}: multistep FMA against rounded: {ratio:.3f} of the bound "
              f"({beyond_single:.1f} of the single-step one)")
        assert 0 < ratio <= 1
        assert beyond_single > 1   # the history terms are needed: the single-step bound is too small


@needs_cpp_loop
def test_cpp_loop_with_a_package_reproduces_the_python_loop(tiny, package):
    _, path = package
    with sr3fast.backend(EXTENSION):  # the same reverse_step kernel in both loops
        for sampler, kwargs in SAMPLER_CASES[1:3]:
            _assert_same_run(f"cpp package {sampler}",
                             _sample(tiny, sampler, kwargs, "cpp", package=open_package(path)),
                             _sample(tiny, sampler, kwargs, "python", package=open_package(path)))


# Run in a fresh interpreter: the package alone, loaded by sr3fast.export with nothing of sr3fast
# imported before (a package exported on a CPU calls the extension's sr3fast::conv2d, whose schema
# exists only once sr3fast._C is imported; this process imported it long ago).
FRESH_PACKAGE_RUN = textwrap.dedent("""
    import json, sys
    import torch
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # fp32_only
    from sr3fast.export import open_package
    package, inputs, output, device = sys.argv[1:]
    assert "sr3fast._C" not in sys.modules, "the fresh process already has the extension"
    args = [t.to(device) for t in torch.load(inputs)]
    with torch.no_grad():
        eps = open_package(package).predict_noise(*args)
    torch.save(eps.cpu(), output)
""")


def run_package_in_a_fresh_process(path, inputs, tmp_path):
    """eps of the package at `path` for inputs (x, y_t, gamma), computed by a new interpreter."""
    torch.save([t.cpu() for t in inputs], tmp_path / "inputs.pt")
    result = subprocess.run([sys.executable, "-c", FRESH_PACKAGE_RUN, str(path), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "eps.pt"), str(DEVICE)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"the package did not run in a fresh process:\n{result.stderr[-3000:]}"
    return torch.load(tmp_path / "eps.pt").to(DEVICE)


def test_package_computes_the_models_noise_prediction(tiny, package, tmp_path):
    """Eager against the package, both in float32 (fp32_only), the package run in a fresh process
    (it must load what it needs, the extension's ops included, by itself): the same maths in
    another order (inductor fuses and reorders, picks its own kernels and layouts), so they may
    differ by float32 summation-order error. Tolerance: support.fp32_atol (8 eps32 sqrt(K) on the
    scale of the result) for the longest reduction K of the U-Net (conv fan-in, group of a
    GroupNorm), once per layer, the layers' errors combined as independent (sqrt of the count);
    GroupNorm keeps every layer's output on the scale of eps, on which the errors are measured."""
    model, _, x = tiny
    info = open_package(package[1]).info(DEVICE)
    assert info.shape == tuple(x.shape) and info.dtype == torch.float32
    assert info.config == model.config.to_dict()
    y_t, gamma = torch.randn_like(x), torch.tensor([0.3], device=DEVICE)
    got = run_package_in_a_fresh_process(package[1], (x, y_t, gamma), tmp_path)
    with torch.no_grad(), fp32_only():
        want = model.predict_noise(x, y_t, gamma)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    group = max(m.num_channels // m.num_groups for m in norms) * x.shape[-2] * x.shape[-1]
    reduction = max(max(m.weight[0].numel() for m in layers), group)
    atol = len(layers) ** 0.5 * fp32_atol(reduction, want.abs().max().item())
    max_err, _ = report("package eps", got, want)
    print(f"tolerance {atol:.3e} ({len(layers)} layers, reductions up to {reduction})")
    assert got.shape == want.shape and max_err <= atol


def test_package_of_another_model_is_refused(tiny, package):
    """The package records its model's config and a fingerprint of its weights; opened for
    another model (other weights, or another config) it refuses to run, in every loop, instead of
    sampling with the wrong network. The same model in another precision is accepted."""
    model, schedule, x = tiny
    path = package[1]
    torch.manual_seed(1)
    retrained = sr3fast.load("tiny").to(DEVICE)        # same architecture, other weights
    config = model.config
    other_config = dataclasses.replace(config, schedule={**config.schedule, "n_timestep": 1000})
    reconfigured = sr3fast.SR3(other_config).to(DEVICE)
    reconfigured.load_state_dict(model.state_dict())  # same weights, other config
    loops = ("python", "cpp") if _CPP_LOOP_REASON is None else ("python",)
    for loop in loops:
        with pytest.raises(ValueError, match="exported from another model: same architecture, different weights"):
            sample("sr3", retrained, x, schedule, loop=loop, package=open_package(path, model=retrained))
        with pytest.raises(ValueError, match=r"another config \(schedule.n_timestep: package 2000, model 1000\)"):
            sample("sr3", reconfigured, x, schedule, loop=loop, package=open_package(path, model=reconfigured))
    info = open_package(path).info(DEVICE)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        info.check_model(copy.deepcopy(model).to(dtype), path)


@needs_cpp_loop
def test_upscale_cpp_loop_and_package_give_the_python_loops_image(package, tmp_path):
    checkpoint, path = package
    model = sr3fast.load(checkpoint, device=DEVICE)
    low = (np.random.default_rng(0).random((4, 4, 3)) * 255).astype(np.uint8)
    image = torch.from_numpy(low).permute(2, 0, 1)[None]
    with sr3fast.backend(EXTENSION), fp32_only():  # one reverse_step kernel; no TF32 (fp32_only)
        want = sr3fast.upscale(image, model, steps=4, seed=3, progress=False)
        package = open_package(path, model=model)
        got = sr3fast.upscale(image, model, steps=4, seed=3, progress=False, loop="cpp", package=package)
        python_package = sr3fast.upscale(image, model, steps=4, seed=3, progress=False, package=package)
    assert got.shape == want.shape == (1, 3, 16, 16)
    assert torch.equal(got, python_package)
    # the package's rounding differs from eager's by ulps; 8-bit output absorbs nearly all of it
    assert (got.int() - want.int()).abs().max() <= 1


@needs_cpp_loop
def test_cli_upscale_with_loop_and_package(package, tmp_path):
    from PIL import Image

    checkpoint, path = package
    Image.fromarray((np.random.default_rng(1).random((4, 4, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    outputs = {}
    for loop in ("python", "cpp"):
        out = tmp_path / f"{loop}.png"
        with sr3fast.backend(EXTENSION):  # the C++ loop's reverse_step for the Python loop too
            assert cli_main(["upscale", str(tmp_path / "in.png"), "-o", str(out), "--model", str(checkpoint),
                             "--steps", "3", "--seed", "0", "-q", "--loop", loop, "--package", str(path),
                             "--device", DEVICE.type]) == 0
        outputs[loop] = np.asarray(Image.open(out))
    assert outputs["python"].shape == (16, 16, 3)
    assert np.array_equal(outputs["python"], outputs["cpp"])


def test_cli_upscale_with_a_package_in_a_fresh_process(package, tmp_path):
    """What a user runs: `sr3fast upscale ... --package p.pt2` with the default Python loop, in a
    new process where nothing has imported the extension yet (it failed with "Could not find
    schema for sr3fast::conv2d"). With --model the package is checked against the model."""
    from PIL import Image

    checkpoint, path = package
    Image.fromarray((np.random.default_rng(1).random((4, 4, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    result = subprocess.run([sys.executable, "-m", "sr3fast", "upscale", str(tmp_path / "in.png"), "-o", str(out),
                             "--model", str(checkpoint), "--steps", "2", "--seed", "0", "-q",
                             "--package", str(path), "--device", DEVICE.type],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out).size == (16, 16)


def test_unknown_loop_is_refused(tiny):
    with pytest.raises(ValueError, match="loop must be one of"):
        _sample(tiny, "sr3", {}, "rust")
    assert LOOPS == ("python", "cpp", "graph")


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the error on a CPU")
def test_graph_loop_on_a_cpu_says_it_needs_cuda(tiny):
    with pytest.raises(ValueError, match="needs a CUDA device.*loop='cpp'"):
        _sample(tiny, "sr3", {}, "graph")


@needs_extension
def test_python_denoiser_errors_come_through_the_cpp_loop(tiny):
    _, schedule, x = tiny

    def broken(x, y_t, gamma):
        raise RuntimeError("denoiser exploded")

    with pytest.raises(RuntimeError, match="denoiser exploded"):
        sample("sr3", SimpleNamespace(predict_noise=broken), x, schedule, loop="cpp")
    with pytest.raises(TypeError, match="must return a tensor"):
        sample("sr3", SimpleNamespace(predict_noise=lambda *a: "eps"), x, schedule, loop="cpp")
    with pytest.raises(ValueError, match="needs a model"):
        sample("sr3", None, x, schedule, loop="cpp")


@needs_extension
def test_package_misuse_says_what_to_do(tiny, package, tmp_path):
    _, schedule, x = tiny
    path = package[1]
    for loop in ("python", "cpp"):
        with pytest.raises(ValueError, match=r"compiled for inputs \(1, 3, 16, 16\).*sr3fast export MODEL --batch 2"):
            sample("sr3", None, x.repeat(2, 1, 1, 1), schedule, loop=loop, package=open_package(path))
        with pytest.raises(TypeError, match=r"an opened package, sr3fast.export.open_package\("):
            sample("sr3", None, x, schedule, loop=loop, package=path)
    with pytest.raises(FileNotFoundError, match="sr3fast export"):
        open_package(tmp_path / "missing.pt2")
    with pytest.raises(ValueError, match="not an sr3fast denoiser package"):
        PackageInfo.from_metadata({"AOTI_DEVICE_KEY": "cpu"}, "other.pt2")


@needs_extension
def test_cpp_loader_refuses_a_package_compiled_for_another_device(package):
    """The C++ loader runs a package on the device it was compiled for (its AOTI_DEVICE_KEY),
    whatever device the inputs are on: a CPU package fed CUDA tensors would read device memory as
    host memory, a crash. It checks the two before any run and says what to export. (meta stands
    for "a device the package was not compiled for" on any machine.)"""
    import sr3fast._C as extension

    path = str(package[1])
    with pytest.raises(RuntimeError, match=rf"compiled for {DEVICE.type}, the inputs are on meta.*"
                                            r"--device meta"):
        extension.package_metadata(path, torch.device("meta"))
    assert extension.package_metadata(path, DEVICE)["AOTI_DEVICE_KEY"] == DEVICE.type


def test_export_refuses_sizes_the_unet_cannot_take(tiny, tmp_path):
    from sr3fast.export import export

    with pytest.raises(ValueError, match="not a multiple of 2"):
        export(tiny[0], tmp_path / "p.pt2", size=15)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(tiny[0], tmp_path / "missing" / "p.pt2")
    assert not list(tmp_path.iterdir())


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("noise", ["torch", "kernel"])
@pytest.mark.parametrize("sampler,kwargs", SAMPLER_CASES, ids=CASE_IDS)
def test_graph_loop_reproduces_the_python_loop(tiny, sampler, kwargs, noise):
    # Same backend, so the graph replays the very kernels the Python loop launches (auto: Triton's
    # reverse_step in both), with the same noise offsets: bit for bit, both noise sources.
    _assert_same_run(f"graph {sampler} {noise}", _sample(tiny, sampler, kwargs, "graph", noise=noise),
                     _sample(tiny, sampler, kwargs, "python", noise=noise))


@needs_cuda
@pytest.mark.cuda
@needs_extension
def test_graph_loop_with_a_package_reproduces_the_python_loop(tiny, package):
    """The package's runner captured in the step's graph: same compiled U-Net, same reverse_step
    kernel, same noise as the Python loop driving the same package."""
    _, path = package
    for sampler, kwargs in SAMPLER_CASES[1:3]:
        _assert_same_run(f"graph package {sampler}",
                         _sample(tiny, sampler, kwargs, "graph", package=open_package(path)),
                         _sample(tiny, sampler, kwargs, "python", package=open_package(path)))


@needs_cuda
@pytest.mark.cuda
def test_graph_loop_draws_fresh_noise_per_call_and_leaves_the_model_alone(tiny):
    first, _ = _sample(tiny, "sr3", {}, "graph", seed=5)
    second, _ = _sample(tiny, "sr3", {}, "graph", seed=6)
    again, _ = _sample(tiny, "sr3", {}, "graph", seed=5)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


@needs_cuda
@pytest.mark.cuda
def test_graph_loop_runs_a_one_step_schedule(tiny):
    model, schedule, x = tiny
    one_step = respace(NoiseSchedule.from_config(model.config.schedule), 1)
    got = sample("sr3", model, x, one_step, generator=torch.Generator(DEVICE).manual_seed(0), loop="graph")
    want = sample("sr3", model, x, one_step, generator=torch.Generator(DEVICE).manual_seed(0))
    assert torch.equal(got, want)


# ---- export of Triton ops whose optional inputs are absent -----------------------------------

class NormDenoiser(torch.nn.Module):
    """A denoiser made of groupnorm_silu calls with the optional inputs absent and present, as the
    U-Net makes them: shift=None (every norm but the one after the noise-level bias), and
    weight=bias=None, next to a call with all of them."""

    def __init__(self, channels: int = 8, groups: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.groups = groups
        self.weight = torch.nn.Parameter(1 + 0.3 * torch.randn(channels, generator=generator))
        self.bias = torch.nn.Parameter(0.3 * torch.randn(channels, generator=generator))
        self.embed = torch.nn.Linear(1, channels)

    def predict_noise(self, x, y_t, gamma):
        h = sr3fast.ops.groupnorm_silu(x + y_t, self.groups)                        # all absent
        h = sr3fast.ops.groupnorm_silu(h, self.groups, self.weight, self.bias)        # shift=None
        shift = self.embed(gamma[:, None])
        return sr3fast.ops.groupnorm_silu(h, self.groups, self.weight, self.bias, shift=shift,
                                          act=False)


def _norm_inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 6, 10, generator=generator).to(DEVICE)
    return x, torch.randn(x.shape, generator=generator).to(DEVICE), torch.tensor([0.3, 0.8], device=DEVICE)


@pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE.type) is not None,
                    reason=f"triton backend: {backends.unavailable_reason('triton', DEVICE.type)}")
def test_export_keeps_the_triton_groupnorm_with_absent_inputs():
    """torch.export of the Triton groupnorm op with shift, weight and bias None (on a CPU through
    the interpreter): the ops stay in the graph as sr3fast::groupnorm_silu_triton with their None
    arguments (which AOTInductor later lowers into the kernels: the CUDA test below), their fake
    implementation gives the real outputs' shapes, dtypes and strides, and the exported program
    computes what the eager module does, bit for bit (the same kernels)."""
    from sr3fast.export import _PredictNoise

    model = NormDenoiser().to(DEVICE).eval()
    x, y_t, gamma = _norm_inputs()
    with sr3fast.backend("triton"), torch.no_grad():
        program = torch.export.export(_PredictNoise(model), (x, y_t, gamma))
        want = model.predict_noise(x, y_t, gamma)
        got = program.module()(x, y_t, gamma)
    nodes = [n for n in program.graph.nodes
             if n.op == "call_function" and "groupnorm_silu_triton" in str(n.target)]
    assert len(nodes) == 3, program.graph
    shifts = [n.args[5] for n in nodes]
    assert shifts[0] is None and shifts[1] is None and shifts[2] is not None
    assert nodes[0].args[2] is None and nodes[0].args[3] is None
    for node in nodes:
        y, mean, rstd = node.meta["val"]
        assert tuple(y.shape) == tuple(x.shape) and y.dtype == x.dtype and y.stride() == x.stride()
        assert tuple(mean.shape) == tuple(rstd.shape) == (2, 4) and mean.dtype == torch.float32
    assert torch.equal(got, want)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.skipif(backends.unavailable_reason("triton", "cuda") is not None,
                    reason=f"triton backend: {backends.unavailable_reason('triton', 'cuda')}")
def test_aoti_package_of_the_triton_groupnorm_with_absent_inputs(tmp_path):
    """The same module through AOTInductor (sr3fast.export.export_denoiser): the op's absent
    shift/weight/bias reach the Triton kernels as placeholder tensors behind their HAS_* constexpr
    flags (kernels/groupnorm_silu.py never passes a kernel None). Inductor lowers those calls into
    the package's C++ launcher; the package must run and agree with eager. Elementwise float32 work around the
    kernels (the Linear, x + y_t) may be fused or reordered by inductor, so the tolerance is
    float32 summation order over the widest reduction (a group: C/G * H * W), 8x over."""
    from sr3fast.export import export_denoiser

    model = NormDenoiser().to(DEVICE).eval()
    x, y_t, gamma = _norm_inputs()
    with sr3fast.backend("triton"), fp32_only(), torch.no_grad():
        path = export_denoiser(model, x, tmp_path / "norms.pt2")
        runner = torch._inductor.aoti_load_package(str(path))
        got = runner(x, y_t, gamma)
        want = model.predict_noise(x, y_t, gamma)
    max_err, _ = report("norms package", got, want)
    assert got.shape == want.shape
    assert max_err <= 8 * fp32_atol(2 * 6 * 10, want.abs().max().item())
