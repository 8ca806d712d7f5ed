"""The sampling loops (sr3fast.diffusion.loops): loop="cpp" and loop="graph" reproduce
loop="python"; packages from `sr3fast export` run in them; every misuse says what to do.

Why exact equality: every loop runs the same denoiser kernels on the same inputs, draws the same
noise from the same generator in the same order, and applies reverse_step with kernels that are
bit-identical to each other (the extension's reverse_step, which the C++ loop calls, is
bit-identical to the reference on a CPU: tests/test_reverse_step.py). So nothing may differ.
"""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sr3fast
from sr3fast.cli import main as cli_main
from sr3fast.diffusion import LOOPS, NoiseSchedule, respace, sample
from sr3fast.export import PackageInfo, load_package

from support import DEVICE, report

STEPS = 6
HAS_EXTENSION = importlib.util.find_spec("sr3fast._C") is not None
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension sr3fast._C is not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="loop='graph' needs a CUDA device")
SAMPLER_CASES = [("sr3", {}), ("posterior", {}), ("ddim", {}), ("ddim", {"eta": 0.5})]
CASE_IDS = ["sr3", "posterior", "ddim", "ddim-eta0.5"]


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
    assert cli_main(["export", str(checkpoint), "-o", str(path), "--device", DEVICE.type]) == 0
    return checkpoint, path


def _sample(tiny, sampler, kwargs, loop, seed=1, **more):
    model, schedule, x = tiny
    steps = []
    generator = torch.Generator(DEVICE).manual_seed(seed)
    y = sample(sampler, model, x, schedule, generator=generator, loop=loop,
               callback=lambda i, y: steps.append((i, y.clone())), **kwargs, **more)
    return y, steps


def _assert_same_run(name, got, want):
    (y_got, steps_got), (y_want, steps_want) = got, want
    report(name, y_got, y_want)
    assert [i for i, _ in steps_got] == list(range(STEPS)) == [i for i, _ in steps_want]
    for (i, a), (_, b) in zip(steps_got, steps_want):
        assert torch.equal(a, b), f"{name}: loop step {i} differs"
    assert torch.equal(y_got, y_want)


@needs_extension
@pytest.mark.parametrize("sampler,kwargs", SAMPLER_CASES, ids=CASE_IDS)
def test_cpp_loop_reproduces_the_python_loop(tiny, sampler, kwargs):
    with sr3fast.backend("auto"):
        _assert_same_run(f"cpp {sampler}", _sample(tiny, sampler, kwargs, "cpp"),
                         _sample(tiny, sampler, kwargs, "python"))


@needs_extension
def test_cpp_loop_with_a_package_reproduces_the_python_loop(tiny, package):
    _, path = package
    for sampler, kwargs in SAMPLER_CASES[1:3]:
        _assert_same_run(f"cpp package {sampler}", _sample(tiny, sampler, kwargs, "cpp", package=path),
                         _sample(tiny, sampler, kwargs, "python", package=path))


@needs_extension
def test_package_computes_the_models_noise_prediction(tiny, package):
    model, _, x = tiny
    runner, info = load_package(package[1], DEVICE)
    assert info.shape == tuple(x.shape) and info.dtype == torch.float32
    assert info.config == model.config.to_dict()
    y_t, gamma = torch.randn_like(x), torch.tensor([0.3], device=DEVICE)
    with torch.no_grad():
        want = model.predict_noise(x, y_t, gamma)
    got = runner(x, y_t, gamma)
    report("package eps", got, want)
    # fp32 on both sides; inductor only reorders and fuses the arithmetic
    torch.testing.assert_close(got, want)


@needs_extension
def test_upscale_cpp_loop_and_package_give_the_python_loops_image(package, tmp_path):
    checkpoint, path = package
    model = sr3fast.load(checkpoint, device=DEVICE)
    low = (np.random.default_rng(0).random((4, 4, 3)) * 255).astype(np.uint8)
    image = torch.from_numpy(low).permute(2, 0, 1)[None]
    want = sr3fast.upscale(image, model, steps=4, seed=3, progress=False)
    got = sr3fast.upscale(image, model, steps=4, seed=3, progress=False, loop="cpp", package=path)
    assert got.shape == want.shape == (1, 3, 16, 16)
    assert torch.equal(got, sr3fast.upscale(image, model, steps=4, seed=3, progress=False, package=path))
    # the package's rounding differs from eager's by ulps; 8-bit output absorbs nearly all of it
    assert (got.int() - want.int()).abs().max() <= 1


@needs_extension
def test_cli_upscale_with_loop_and_package(package, tmp_path):
    from PIL import Image

    checkpoint, path = package
    Image.fromarray((np.random.default_rng(1).random((4, 4, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    outputs = {}
    for loop in ("python", "cpp"):
        out = tmp_path / f"{loop}.png"
        assert cli_main(["upscale", str(tmp_path / "in.png"), "-o", str(out), "--model", str(checkpoint),
                         "--steps", "3", "--seed", "0", "-q", "--loop", loop, "--package", str(path),
                         "--device", DEVICE.type]) == 0
        outputs[loop] = np.asarray(Image.open(out))
    assert outputs["python"].shape == (16, 16, 3)
    assert np.array_equal(outputs["python"], outputs["cpp"])


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
            sample("sr3", None, x.repeat(2, 1, 1, 1), schedule, loop=loop, package=path)
        with pytest.raises(FileNotFoundError, match="sr3fast export"):
            sample("sr3", None, x, schedule, loop=loop, package=tmp_path / "missing.pt2")
    with pytest.raises(ValueError, match="not an sr3fast denoiser package"):
        PackageInfo.from_metadata({"AOTI_DEVICE_KEY": "cpu"}, "other.pt2")


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
    # the graph replays the very kernels the Python loop launches, with the same noise offsets
    _assert_same_run(f"graph {sampler} {noise}", _sample(tiny, sampler, kwargs, "graph", noise=noise),
                     _sample(tiny, sampler, kwargs, "python", noise=noise))


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
