"""The default model shipped inside the package: the committed file, loaded with no network, and
used by upscale and the command line when no model is given; and the recommended inference
settings a checkpoint carries."""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sr3fast
from sr3fast import api
from sr3fast.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from sr3fast.inference_settings import InferenceSettings
from sr3fast.train.data import quantize, resize
from sr3fast.train.metrics import consistency

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return sr3fast.load("tiny")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the default model must load without the network")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_shipped_file_is_the_committed_one():
    recorded = api.DEFAULT_WEIGHTS.with_suffix(".sha256").read_text().split()
    assert recorded[1] == api.DEFAULT_WEIGHTS.name
    assert hashlib.sha256(api.DEFAULT_WEIGHTS.read_bytes()).hexdigest() == recorded[0]
    assert api.DEFAULT_WEIGHTS.stat().st_size <= 25 * 1000 ** 2
    _, tensors, metadata = read_checkpoint(api.DEFAULT_WEIGHTS)
    assert {t.dtype for t in tensors.values()} == {torch.float16}   # half the bytes of float32
    assert InferenceSettings.from_metadata(metadata) is not None


def test_default_loads_offline_as_a_trained_4x_model(no_network):
    model = sr3fast.load("default")
    assert model.config.high_res // model.config.low_res == 4
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    settings = model.inference_settings
    assert settings.sampler in sr3fast.diffusion.SAMPLERS and settings.steps >= 1
    half = sr3fast.load("default", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_default_is_not_a_preset_and_takes_no_config():
    with pytest.raises(ValueError, match="config="):
        sr3fast.load("default", config={"unet": {}})


def test_upscale_without_a_model_uses_the_default(no_network):
    low = np.asarray(Image.open(EXAMPLES / "coffee_64.png"))[:16, :16]
    out = sr3fast.upscale(torch.from_numpy(low.copy()).permute(2, 0, 1)[None], seed=0, progress=False)
    assert out.shape == (1, 3, 64, 64) and out.dtype == torch.uint8
    again = sr3fast.upscale(torch.from_numpy(low.copy()).permute(2, 0, 1)[None], model="default",
                            seed=0, progress=False)
    assert torch.equal(out, again)


def _as_unit(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def test_the_default_model_is_trained_it_keeps_the_input_better_than_bicubic():
    # A held-out photo (the README's example), 32x32 -> 128x128: the trained model's output,
    # downsampled, must match its input more closely than bicubic upsampling's does (the issue's
    # goal is at most half of bicubic's). Untrained or wrongly loaded weights give noise, whose
    # consistency is orders of magnitude worse.
    low = _as_unit(EXAMPLES / "coffee_64.png")[..., 16:48, 16:48]
    out = quantize(sr3fast.upscale(low, seed=0, progress=False))
    bicubic = quantize(resize(low, (128, 128)))
    assert consistency(out, low).item() < 0.5 * consistency(bicubic, low).item()


def test_the_example_is_a_degraded_crop_of_a_held_out_photo():
    # what README and DATA.md say about examples/: the 256 crop of scikit-image's coffee, and
    # its 4x bicubic-antialiased downsampling rounded to 8 bits
    from skimage import data

    truth = np.asarray(Image.open(EXAMPLES / "coffee_256.png"))
    assert np.array_equal(truth, data.coffee()[80:336, 190:446])
    expected = quantize(resize(_as_unit(EXAMPLES / "coffee_256.png"), (64, 64)))
    assert torch.equal(_as_unit(EXAMPLES / "coffee_64.png"), expected)


# --- recommended inference settings -------------------------------------------------------

def test_upscale_takes_the_models_recommended_settings_unless_told_otherwise(tiny, monkeypatch):
    seen = []

    def record(name, model, x, schedule, **kwargs):
        seen.append((name, schedule.num_steps))
        return torch.zeros_like(x)

    monkeypatch.setattr(sr3fast.diffusion, "sample", record)
    x = torch.rand(1, 3, 4, 4)
    recommended = {"schedule": "linear", "n_timestep": 7, "linear_start": 1e-4, "linear_end": 0.1}
    tiny.inference_settings = InferenceSettings(sampler="ddim", schedule=recommended)
    sr3fast.upscale(x, model=tiny, progress=False)
    sr3fast.upscale(x, model=tiny, steps=3, progress=False)       # other steps: training schedule
    sr3fast.upscale(x, model=tiny, sampler="sr3", progress=False)
    tiny.inference_settings = InferenceSettings(sampler="ddim", steps=9, start_gamma=0.5)
    sr3fast.upscale(x, model=tiny, progress=False)                 # truncated, then respaced
    tiny.inference_settings = None
    sr3fast.upscale(x, model=tiny, progress=False)
    assert seen == [("ddim", 7), ("ddim", 3), ("sr3", 7), ("ddim", 9), ("posterior", 100)]


def test_settings_round_trip_through_a_checkpoint(tiny, tmp_path):
    tiny.inference_settings = InferenceSettings(sampler="ddim", steps=25, start_gamma=0.4)
    sr3fast.save(tiny, tmp_path / "m.safetensors", dtype=torch.float16)
    loaded = sr3fast.load(tmp_path / "m.safetensors")
    assert loaded.inference_settings == InferenceSettings(sampler="ddim", steps=25, start_gamma=0.4)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    for name, value in tiny.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.half())


@pytest.mark.parametrize("bad, match", [
    ('{"sampler": "euler"}', "not one of"),
    ('{"steps": 0}', "positive integer"),
    ('{"steps": 5, "schedule": {"schedule": "linear", "n_timestep": 7, "linear_start": 1e-4, '
     '"linear_end": 0.1}}', "7 steps"),
])
def test_invalid_settings_in_a_checkpoint_are_refused(tiny, tmp_path, bad, match):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny.state_dict(), tiny.config.to_dict(), metadata={"inference": bad})
    with pytest.raises(CheckpointError, match=match):
        sr3fast.load(path)


def test_the_command_line_upscales_with_the_default_model(tmp_path, no_network):
    from sr3fast.cli import main

    Image.open(EXAMPLES / "coffee_64.png").crop((8, 8, 24, 24)).save(tmp_path / "in.png")
    assert main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--seed", "0", "-q"]) == 0
    expected = sr3fast.upscale(tmp_path / "in.png", seed=0, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected))


# --- starting from the noised input (start_gamma) -----------------------------------------

def test_truncate_keeps_the_levels_down_to_min_gamma():
    from sr3fast.diffusion import NoiseSchedule, truncate

    full = NoiseSchedule.from_config({"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6,
                                      "linear_end": 1e-2})
    short = truncate(full, 0.5)
    kept = short.num_steps
    assert torch.equal(short.betas, full.betas[:kept])
    assert full.gammas[kept - 1] >= 0.5 > full.gammas[kept]
    assert truncate(full, 0.999999999).num_steps == 1
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        truncate(full, 1.0)


def _capture_sample(monkeypatch):
    seen = {}

    def record(name, model, x, schedule, **kwargs):
        seen.update(name=name, x=x, schedule=schedule, **kwargs)
        return torch.zeros_like(x)

    monkeypatch.setattr(sr3fast.diffusion, "sample", record)
    return seen


def test_start_gamma_starts_from_the_noised_condition(tiny, monkeypatch):
    seen = _capture_sample(monkeypatch)
    x = torch.rand(1, 3, 4, 4)
    sr3fast.upscale(x, model=tiny, steps=10, start_gamma=0.5, seed=3, progress=False)
    schedule, condition = seen["schedule"], seen["x"]
    g_T = schedule.gammas[-1].item()
    assert schedule.num_steps == 10 and 0.5 <= g_T < 0.51        # the chain starts at ~0.5
    z = torch.randn(condition.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(seen["y_T"], g_T ** 0.5 * condition + (1 - g_T) ** 0.5 * z)
    sr3fast.upscale(x, model=tiny, steps=10, start_gamma=0, seed=3, progress=False)
    assert seen["y_T"] is None and seen["schedule"].gammas[-1] < 1e-4  # 0: from pure noise


def test_with_an_exact_denoiser_upscale_returns_the_image_it_was_given(tiny):
    # A denoiser that knows y_0 is the condition x predicts the noise exactly; deterministic DDIM
    # must then land on x itself, whatever the start. Catches an input that is dropped, shifted,
    # or a start state that is not the noised condition.
    def exact(x, y_t, gamma):
        g = gamma.view(-1, 1, 1, 1).to(y_t.dtype)
        return (y_t - g.sqrt() * x) / (1 - g).sqrt()

    tiny.predict_noise = exact
    try:
        x = torch.rand(1, 3, 6, 5)
        condition = (resize(x, (24, 20)) * 2 - 1 + 1) / 2     # the bicubic condition in [0, 1]
        for start in (0.3, 0):
            out = sr3fast.upscale(x, model=tiny, sampler="ddim", steps=8, start_gamma=start, seed=0,
                                  progress=False)
            torch.testing.assert_close(out, condition, atol=2e-5, rtol=0)
    finally:
        del tiny.predict_noise


def test_start_gamma_is_checked(tiny):
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="start_gamma must lie in"):
        sr3fast.upscale(x, model=tiny, start_gamma=1.0, progress=False)
    # with a schedule, sampling from the noised input starts at its first level: they must agree
    with pytest.raises(ValueError, match="must agree"):
        sr3fast.upscale(x, model=tiny, start_gamma=0.5, progress=False,
                        schedule={"schedule": "linear", "n_timestep": 7, "linear_start": 1e-4, "linear_end": 0.1})
    with pytest.raises(ValueError, match="must agree"):
        InferenceSettings(start_gamma=0.5, schedule={"schedule": "linear", "n_timestep": 7,
                                                     "linear_start": 1e-4, "linear_end": 0.1})
    tuned = {"schedule": "lambda", "n_timestep": 7, "lambda_start": 0.0, "lambda_end": 5.0}
    assert InferenceSettings(start_gamma=0.5, schedule=tuned).steps == 7   # g_T = sigmoid(0) = 0.5


# --- back-projection ------------------------------------------------------------------------

def test_back_projection_makes_the_output_agree_with_its_input_and_keeps_the_detail():
    from skimage import data

    from sr3fast.evaluation import sharpness
    from sr3fast.projection import back_project

    truth = torch.from_numpy(data.astronaut()[100:228, 180:308].copy()).permute(2, 0, 1)[None].float() / 255
    low = resize(truth, (32, 32))
    # a detailed output that does not match the input: the truth under a smooth colour cast
    ramp = torch.linspace(0, 0.1, 128).view(1, 1, 1, 128) * torch.tensor([1.0, -0.5, 0.3]).view(1, 3, 1, 1)
    wrong = (truth * 0.9 + 0.05 + ramp).clamp(0, 1)
    errors = [consistency(back_project(wrong, low, k), low).item() for k in range(4)]
    print("consistency by iteration:", errors)
    # the first step removes most of the disagreement, later ones the rest more slowly (the
    # frequencies near the edge of the downsampling's passband converge slowest)
    assert errors[1] < errors[0] / 5 and all(b < 0.9 * a for a, b in zip(errors, errors[1:]))
    projected = back_project(wrong, low, 2)
    # the correction is low-pass: the detail comes back at the truth's strength, undoing the
    # 0.9 contrast (energy x 0.81) only where the downsampling sees it
    ratio = sharpness(projected).item() / sharpness(wrong).item()
    print("sharpness after / before:", ratio)
    assert 0.95 < ratio < 1 / 0.81
    # an output that already agrees with its input is a fixed point (but where the input was
    # clamped to [0, 1] after a bicubic overshoot)
    assert (back_project(truth, low, 2) - truth).abs().mean() < 1e-3      # a quarter of an 8-bit level
    assert torch.equal(back_project(wrong, low, 0), wrong)


def test_upscale_back_projects_with_the_models_recommended_count(tiny):
    x = torch.rand(1, 3, 4, 4)
    plain = sr3fast.upscale(x, model=tiny, steps=3, seed=0, progress=False)
    from sr3fast.projection import back_project
    projected = sr3fast.upscale(x, model=tiny, steps=3, seed=0, progress=False, back_projections=2)
    torch.testing.assert_close(projected, back_project(plain, x, 2))
    tiny.inference_settings = InferenceSettings(back_projections=2)
    try:
        assert torch.equal(sr3fast.upscale(x, model=tiny, steps=3, seed=0, progress=False), projected)
        assert torch.equal(sr3fast.upscale(x, model=tiny, steps=3, seed=0, progress=False,
                                           back_projections=0), plain)
    finally:
        tiny.inference_settings = None
    with pytest.raises(ValueError, match="back_projections"):
        sr3fast.upscale(x, model=tiny, steps=3, back_projections=-1, progress=False)
