"""The public API and CLI: load (presets, sr3fast and public checkpoints), save, convert, upscale,
and every bad input a user can cause."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sr3fast
from sr3fast.checkpoint import CheckpointError
from sr3fast.cli import main as cli
from peer_sr3 import GaussianDiffusion, UNet

TINY_UNET = {"in_channel": 6, "out_channel": 3, "inner_channel": 16, "channel_multiplier": [1, 2],
             "attn_res": [8], "res_blocks": 1, "dropout": 0, "norm_groups": 4}
SCHEDULE = {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 1e-2}

# the shape of the public code's config files, // comments included
PUBLIC_JSON = """{
    "name": "tiny_test",
    "phase": "val", // train or val
    "datasets": {"val": {"l_resolution": 4, "r_resolution": 16, "data_len": 3}},
    "model": {
        "which_model_G": "sr3", // ddpm or sr3
        "unet": %s,
        "beta_schedule": {"train": %s, "val": %s},
        "diffusion": {"image_size": 16, "channels": 3, "conditional": true}
    }
}"""


def _public_config(tmp_path, unet=TINY_UNET, name="config.json"):
    path = tmp_path / name
    path.write_text(PUBLIC_JSON % (json.dumps(unet), json.dumps(SCHEDULE), json.dumps(SCHEDULE)))
    return path


def _public_checkpoint(tmp_path, unet=TINY_UNET, norm_groups=4, seed=0):
    """A *_gen.pth as the public code writes it: GaussianDiffusion.state_dict() with torch.save."""
    torch.manual_seed(seed)
    denoise_fn = UNet(in_channel=6, out_channel=3, inner_channel=unet["inner_channel"],
                      norm_groups=norm_groups, channel_mults=tuple(unet["channel_multiplier"]),
                      attn_res=tuple(unet["attn_res"]), res_blocks=unet["res_blocks"], image_size=16)
    with torch.no_grad():
        for parameter in denoise_fn.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    net = GaussianDiffusion(denoise_fn, image_size=16, schedule_opt=SCHEDULE).eval()
    path = tmp_path / "I100_E1_gen.pth"
    torch.save(net.state_dict(), path)
    return path, net


def _noisy_inputs(batch=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    y_t = torch.randn(batch, 3, size, size, generator=g)
    gamma = torch.rand(batch, generator=g) * 0.98 + 0.01
    return x, y_t, gamma


# ---------------------------------------------------------------- loading

def test_preset_loads_in_eval_mode_with_dtype():
    model = sr3fast.load("tiny", dtype=torch.float64)
    assert isinstance(model, sr3fast.SR3) and not model.training
    assert next(model.parameters()).dtype == torch.float64


def test_public_checkpoint_predicts_what_the_public_code_predicts(tmp_path):
    config = _public_config(tmp_path)
    checkpoint, peer = _public_checkpoint(tmp_path)
    model = sr3fast.load(checkpoint, config=config)
    assert (model.config.low_res, model.config.high_res) == (4, 16)
    x, y_t, gamma = _noisy_inputs()
    with torch.no_grad():
        eps = model.predict_noise(x, y_t, gamma)
        expected = peer.denoise_fn(torch.cat([x, y_t], 1), gamma.sqrt().view(-1, 1))
    # same weights, same arithmetic up to fp32 summation order in the fused ops
    torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5)


def test_convert_then_load_gives_identical_outputs(tmp_path, capsys):
    config = _public_config(tmp_path)
    checkpoint, _ = _public_checkpoint(tmp_path)
    out = tmp_path / "tiny.safetensors"
    assert cli(["convert", str(checkpoint), "--config", str(config), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    direct, converted = sr3fast.load(checkpoint, config=config), sr3fast.load(out)
    assert converted.config == direct.config
    x, y_t, gamma = _noisy_inputs()
    with torch.no_grad():
        assert torch.equal(direct.predict_noise(x, y_t, gamma), converted.predict_noise(x, y_t, gamma))


def test_save_load_round_trip_is_exact(tmp_path):
    model = sr3fast.load("tiny-paper")
    path = sr3fast.save(model, tmp_path / "m.safetensors")
    again = sr3fast.load(path)
    assert again.config == model.config
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_dataparallel_prefix_is_accepted(tmp_path):
    config = _public_config(tmp_path)
    checkpoint, _ = _public_checkpoint(tmp_path)
    state = torch.load(checkpoint, weights_only=True)
    torch.save({"module." + k: v for k, v in state.items()}, checkpoint)
    sr3fast.load(checkpoint, config=config)


# ---------------------------------------------------------------- bad checkpoints and configs

def _with_stored_schedule(tmp_path, checkpoint, schedule):
    """The checkpoint with its schedule buffers replaced by those of `schedule` (a public
    GaussianDiffusion built with it writes them), as a checkpoint trained with it would hold."""
    from peer_sr3 import GaussianDiffusion as Peer

    state = torch.load(checkpoint, weights_only=True)
    tables = Peer(torch.nn.Identity(), image_size=16, schedule_opt=schedule).state_dict()
    state.update({key: value for key, value in tables.items() if key in state})
    path = tmp_path / "other_schedule_gen.pth"
    torch.save(state, path)
    return path


def test_stored_betas_that_disagree_with_the_config_are_reported(tmp_path):
    """A *_gen.pth whose stored betas are not its config's schedule (trained with another config):
    a warning names both schedules, which one sr3fast uses (the config's) and why, and what to do.
    Betas that match the config's train or val schedule load silently."""
    import warnings

    from sr3fast.compat import public_sr3

    config = _public_config(tmp_path)
    checkpoint, _ = _public_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # the matching checkpoint: no warning
        sr3_config, state = public_sr3.read_public_model(checkpoint, config)
    assert "unet.noise_level_mlp.1.weight" in state and "betas" not in state
    other = {**SCHEDULE, "linear_end": 2e-2}
    mismatched = _with_stored_schedule(tmp_path, checkpoint, other)
    with pytest.warns(public_sr3.ScheduleMismatchWarning) as caught:
        again, _ = public_sr3.read_public_model(mismatched, config)
    message = str(caught[0].message)
    print(message)
    assert "betas: 2000 steps, 1e-06 .. 0.02" in message
    assert "train: linear, 2000 steps, 1e-06 .. 0.01" in message
    assert "sr3fast uses the config's (linear, 2000 steps, 1e-06 .. 0.01)" in message
    assert "pass the JSON config it was trained with" in message
    assert again.schedule == sr3_config.schedule == SCHEDULE   # the config's schedule is used
    # matching the val phase of the config (what the public code samples with) is fine too
    both = tmp_path / "both.json"
    both.write_text(PUBLIC_JSON % (json.dumps(TINY_UNET), json.dumps(SCHEDULE), json.dumps(other)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        public_sr3.read_public_model(mismatched, both)
    # and sr3fast.load says it too
    with pytest.warns(public_sr3.ScheduleMismatchWarning, match="sr3fast uses the config's"):
        sr3fast.load(mismatched, config=config)


def test_checkpoint_of_another_architecture_lists_the_mismatches(tmp_path):
    config = _public_config(tmp_path)
    other = {**TINY_UNET, "inner_channel": 8, "res_blocks": 2}
    checkpoint, _ = _public_checkpoint(tmp_path, unet=other)
    with pytest.raises(CheckpointError) as info:
        sr3fast.load(checkpoint, config=config)
    message = str(info.value)
    assert "missing key(s)" in message or "unexpected key(s)" in message
    assert "mis-shaped key(s)" in message and "unet.downs.0.weight: checkpoint (8, 6, 3, 3)" in message
    assert "norm_groups" in message            # the suggested fix names what to check


def test_config_whose_norm_groups_do_not_divide_the_channels(tmp_path):
    config = _public_config(tmp_path, unet={**TINY_UNET, "norm_groups": 5})
    checkpoint, _ = _public_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="norm_groups"):
        sr3fast.load(checkpoint, config=config)


def test_public_checkpoint_without_config_says_to_pass_it(tmp_path):
    checkpoint, _ = _public_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="config="):
        sr3fast.load(checkpoint)


def test_truncated_checkpoints_are_refused(tmp_path):
    config = _public_config(tmp_path)
    checkpoint, _ = _public_checkpoint(tmp_path)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        sr3fast.load(checkpoint, config=config)
    saved = sr3fast.save(sr3fast.load("tiny"), tmp_path / "m.safetensors")
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        sr3fast.load(saved)


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    config = _public_config(tmp_path)
    path = tmp_path / "evil_gen.pth"
    torch.save({"denoise_fn.x": torch.ones(1), "payload": os.system}, path)
    with pytest.raises(CheckpointError, match="more than tensors"):
        sr3fast.load(path, config=config)


def test_optimizer_state_file_is_recognised(tmp_path):
    config = _public_config(tmp_path)
    path = tmp_path / "I100_E1_opt.pth"
    torch.save({"epoch": 1, "iter": 100, "scheduler": None, "optimizer": {"state": {}, "param_groups": []}},
               path)
    with pytest.raises(CheckpointError, match="_gen.pth"):
        sr3fast.load(path, config=config)


def test_missing_files_and_unknown_presets():
    with pytest.raises(FileNotFoundError, match="preset"):
        sr3fast.load("no-such-model")
    with pytest.raises(FileNotFoundError):
        sr3fast.load("/nonexistent/I1_E1_gen.pth", config={})


# ---------------------------------------------------------------- upscale

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return sr3fast.load("tiny")


def test_upscale_returns_the_kind_it_was_given(tiny, tmp_path):
    factor = tiny.config.high_res // tiny.config.low_res
    x = torch.rand(2, 3, 4, 4)
    out = sr3fast.upscale(x, model=tiny, steps=3, seed=0, progress=False)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4 * factor, 4 * factor)
    assert out.min() >= 0 and out.max() <= 1
    as_uint8 = sr3fast.upscale((x * 255).to(torch.uint8), model=tiny, steps=3, seed=0, progress=False)
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == out.shape
    image = Image.fromarray(np.zeros((5, 6, 3), dtype=np.uint8))
    assert sr3fast.upscale(image, model=tiny, steps=2, seed=0, progress=False).size == (6 * factor, 5 * factor)
    image.save(tmp_path / "in.png")
    assert sr3fast.upscale(tmp_path / "in.png", model=tiny, steps=2, seed=0, progress=False).size == \
        (6 * factor, 5 * factor)


def test_upscale_is_reproducible_for_a_seed(tiny):
    x = torch.rand(1, 3, 4, 4)
    a = sr3fast.upscale(x, model=tiny, steps=4, seed=7, progress=False)
    b = sr3fast.upscale(x, model=tiny, steps=4, seed=7, progress=False)
    c = sr3fast.upscale(x, model=tiny, steps=4, seed=8, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _deep_4x_model():
    """A 4x model whose U-Net halves the resolution three times: sizes must be multiples of 8,
    which 4x outputs (multiples of 4) often are not, so upscale has to pad."""
    from sr3fast.model import SR3, SR3Config, UNetConfig

    torch.manual_seed(0)
    unet = UNetConfig(variant="public", inner_channel=8, channel_mults=(1, 1, 2, 2), attn_res=(),
                      res_blocks=1, norm_groups=4, image_size=32)
    return SR3(SR3Config(unet, dict(SCHEDULE), 8, 32)).eval()


@pytest.mark.parametrize("height, width, mode", [(3, 5, "reflect"), (1, 1, "replicate")])
def test_sizes_the_unet_cannot_take_are_padded_and_cropped_back(height, width, mode):
    """upscale of an image whose output size the U-Net cannot take (12 x 20 and 4 x 4 for a
    multiple of 8) equals sampling the condition padded by hand to the next multiple (reflection;
    replication where the pad is not smaller than the side) and cropping the result back, for
    the same seed: the noise is drawn at the padded size, and the crop keeps the top-left."""
    import torch.nn.functional as F

    from sr3fast.diffusion import NoiseSchedule, respace, sample

    model = _deep_4x_model()
    multiple, factor = model.size_multiple, model.config.high_res // model.config.low_res
    out_h, out_w = height * factor, width * factor
    assert multiple == 8 and (out_h % multiple or out_w % multiple)   # padding is needed
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(2))
    got = sr3fast.upscale(x, model=model, steps=3, sampler="sr3", seed=5, progress=False)

    condition = F.interpolate(x * 2 - 1, size=(out_h, out_w), mode="bicubic", align_corners=False,
                              antialias=True).clamp(-1, 1)
    padded = F.pad(condition, (0, -out_w % multiple, 0, -out_h % multiple), mode=mode)
    assert padded.shape[-2:] == (-(-out_h // multiple) * multiple, -(-out_w // multiple) * multiple)
    schedule = respace(NoiseSchedule.from_config(model.config.schedule), 3)
    with torch.no_grad():
        y = sample("sr3", model, padded, schedule, generator=torch.Generator().manual_seed(5))
    want = ((y[..., :out_h, :out_w] + 1) / 2).clamp(0, 1)
    assert got.shape == (1, 3, out_h, out_w)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_upscale_with_a_cuda_model_gives_back_the_inputs_kind_and_one_image_per_seed():
    """A model on the GPU and images on the CPU: the result comes back as the input came (kind,
    dtype, device), reproducibly for a seed, and every backend that runs on CUDA gives the same
    8-bit image up to one level. Backends differ only in rounding (the Triton reverse_step
    contracts FMAs, the extension's rounds each operation; the fused norms and attention sum in
    other orders): float32 ulps that 4 steps of a small U-Net keep far below 1/255. TF32 is off
    for the comparison: with it, a one-ulp change of a convolution's input can flip its TF32
    rounding (2^-11 relative), which no longer stays below an 8-bit level."""
    from sr3fast import backends

    torch.manual_seed(0)
    model = sr3fast.load("tiny", device="cuda")
    x = torch.rand(1, 3, 4, 4)
    out = sr3fast.upscale(x, model=model, steps=4, seed=7, progress=False)
    assert out.device.type == "cpu" and out.dtype == torch.float32 and out.shape == (1, 3, 16, 16)
    assert torch.equal(out, sr3fast.upscale(x, model=model, steps=4, seed=7, progress=False))
    on_gpu = sr3fast.upscale(x.cuda(), model=model, steps=4, seed=7, progress=False)
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), out)
    pixels = (x * 255).to(torch.uint8)
    images = {}
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name in ("reference", "triton", "cuda"):
            if backends.unavailable_reason(name, "cuda") is None:
                with sr3fast.backend(name):
                    images[name] = sr3fast.upscale(pixels, model=model, steps=4, seed=7, progress=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    for name, image in images.items():
        assert image.dtype == torch.uint8 and image.device.type == "cpu"
        levels = (image.int() - images["reference"].int()).abs()
        print(f"{name}: {int((levels > 0).sum())} of {levels.numel()} values differ from the "
              f"reference backend's, by at most {int(levels.max())}")
        assert levels.max() <= 1, name


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_steps_must_be_a_positive_integer(tiny, steps):
    with pytest.raises(ValueError, match="steps"):
        sr3fast.upscale(torch.rand(1, 3, 4, 4), model=tiny, steps=steps)


def test_upscale_without_a_model_says_how_to_get_one(tmp_path, monkeypatch):
    """Without a model, upscale uses the default model; where an installation lacks its weights,
    the error says so and how to get them (tests/test_default_model.py runs the model itself)."""
    from sr3fast import api

    monkeypatch.setattr(api, "DEFAULT_WEIGHTS", tmp_path / "default-4x.safetensors")
    monkeypatch.setattr(api, "_DEFAULT_MODELS", {})
    with pytest.raises(FileNotFoundError, match="default model's weights are missing.*reinstall"):
        sr3fast.upscale(torch.rand(1, 3, 4, 4))


def test_bad_images_are_refused_before_any_work(tiny):
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        sr3fast.upscale(torch.rand(3, 4, 4), model=tiny)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sr3fast.upscale(torch.rand(1, 3, 4, 4) * 2 - 1, model=tiny)
    with pytest.raises(ValueError, match="NaN"):
        sr3fast.upscale(torch.full((1, 3, 4, 4), float("nan")), model=tiny)
    with pytest.raises(FileNotFoundError):
        sr3fast.upscale("/nonexistent/photo.png", model=tiny)


# ---------------------------------------------------------------- command line

@pytest.fixture
def photo(tmp_path):
    """A real photograph: scikit-image's bundled astronaut (NASA, public domain), shrunk."""
    skimage_data = pytest.importorskip("skimage.data")
    image = Image.fromarray(skimage_data.astronaut()).resize((10, 8), Image.BICUBIC)
    path = tmp_path / "astronaut.png"
    image.save(path)
    return path


def test_cli_upscales_a_real_photo(photo, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert cli(["upscale", str(photo), "-o", str(out), "--model", "tiny", "--steps", "3", "--seed",
                "1", "-q"]) == 0
    assert Image.open(out).size == (40, 32)
    assert "astronaut.png ->" in capsys.readouterr().out


def test_cli_upscales_a_folder_into_a_folder(photo, tmp_path):
    Image.open(photo).save(tmp_path / "second.jpg")
    out = tmp_path / "results"
    assert cli(["upscale", str(tmp_path), "-o", str(out), "--model", "tiny", "--steps", "2", "-q"]) == 0
    assert sorted(os.listdir(out)) == ["astronaut.png", "second.png"]


def _refused(argv, capsys, match: str) -> None:
    """The command refuses `argv` without a traceback: a non-zero exit (a returned status or
    SystemExit) with a message matching `match`."""
    import re

    try:
        status, message = cli(argv), ""
    except SystemExit as exit:
        status, message = exit.code, str(exit.code)
    message += capsys.readouterr().err
    assert status not in (0, None), f"{argv} was not refused"
    assert re.search(match, message), f"{argv}: {message!r} does not say {match!r}"


def test_cli_bad_inputs_write_nothing(photo, tmp_path, capsys):
    _refused(["upscale", str(photo), "-o", str(tmp_path / "no" / "such" / "out.png"), "--model", "tiny"],
             capsys, "does not exist")
    _refused(["upscale", str(tmp_path / "absent.png"), "-o", str(tmp_path / "o.png"), "--model", "tiny"],
             capsys, "does not exist")
    _refused(["upscale", str(photo), "-o", str(tmp_path / "o.png"), "--model", "tiny", "--steps", "0"],
             capsys, "--steps")
    _refused(["upscale", str(photo), "-o", str(tmp_path / "o.png"), "--model", "nope"], capsys, "preset")
    assert sorted(os.listdir(tmp_path)) == ["astronaut.png"]


def test_cli_bad_inputs_for_a_folder_write_nothing(photo, tmp_path, capsys):
    """The same refusals when the output is a folder (a folder of images in, or -o naming a
    folder that does not exist yet): no folder is created, nothing is written."""
    photos = tmp_path / "photos"
    photos.mkdir()
    photo.rename(photos / "astronaut.png")
    Image.open(photos / "astronaut.png").save(photos / "second.png")
    out = tmp_path / "results"
    _refused(["upscale", str(photos), "-o", str(tmp_path / "no" / "such" / "results"), "--model", "tiny"],
             capsys, "does not exist")
    _refused(["upscale", str(tmp_path / "absent"), "-o", str(out), "--model", "tiny"], capsys, "does not exist")
    _refused(["upscale", str(photos), "-o", str(out), "--model", "tiny", "--steps", "0"], capsys, "--steps")
    _refused(["upscale", str(photos), "-o", str(out), "--model", "nope"], capsys, "preset")
    _refused(["upscale", str(photos / "astronaut.png"), str(photos / "second.png"), "-o", str(out),
              "--model", "nope"], capsys, "preset")     # several files in: -o is a folder
    assert sorted(os.listdir(tmp_path)) == ["photos"]
    assert sorted(os.listdir(photos)) == ["astronaut.png", "second.png"]


def test_cli_lists_presets_and_backends(capsys):
    assert cli(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "public-16-128" in listing and "tiny" in listing
    assert cli(["backends"]) == 0
    assert "groupnorm_silu" in capsys.readouterr().out


def test_a_regression_baseline_checkpoint_loads_but_is_not_sampled(tmp_path):
    from sr3fast.checkpoint import save_checkpoint
    model = sr3fast.load("tiny")
    path = save_checkpoint(tmp_path / "reg.safetensors", model.state_dict(), model.config.to_dict(),
                           {"mode": "regression"})
    loaded = sr3fast.load(path)
    assert loaded.objective == "regression"
    with pytest.raises(ValueError, match="regression.predict"):
        sr3fast.upscale(torch.rand(1, 3, 4, 4), model=loaded, steps=1)
