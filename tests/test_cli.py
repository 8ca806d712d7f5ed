"""The command line as a user meets it: start-up cost, --version, one exit-status scheme, clear
errors (device, memory, model folders, non-finite results) that leave nothing on disk, --dtype,
--seed with presets, DDIM's eta."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sr3fast
from sr3fast import api
from sr3fast.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser
from sr3fast.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent


def _run_python(code: str) -> str:
    """stdout of `code` in a fresh interpreter (what a user's first command pays for)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env, cwd=ROOT).stdout


def _random_photo(path: Path, height: int, width: int, seed: int) -> Path:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def photo(tmp_path):
    """A 4x4 RGB image: the tiny preset makes 16x16 of it."""
    return _random_photo(tmp_path / "in.png", 4, 4, seed=0)


def _upscale(photo, out, *extra):
    return cli(["upscale", str(photo), "-o", str(out), "--model", "tiny", "--steps", "2", "-q", *extra])


def _no_traceback(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- start-up cost, --version

def test_help_version_and_presets_need_no_torch():
    out = _run_python(
        "import sys\n"
        "from sr3fast.cli import main\n"
        "for argv in (['--help'], ['upscale', '--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (argv, exit.code)\n"
        "assert main(['presets']) == 0\n"
        "print('torch imported:', 'torch' in sys.modules)\n")
    assert "compact-4x" in out and "tiny" in out
    assert out.strip().endswith("torch imported: False")


def test_building_a_model_does_not_import_dynamo():
    out = _run_python("import sys, sr3fast.model\n"
                      "sr3fast.model.build('tiny')\n"
                      "print('torch._dynamo' in sys.modules)\n")
    assert out.strip() == "False"


def test_dispatch_marks_its_lookup_constant_as_torch_does():
    # _dispatch sets the flag itself to avoid importing dynamo; torch must still read that flag.
    from sr3fast.ops import _dispatch

    def probe():
        return 0

    assert torch.compiler.assume_constant_result(probe)._dynamo_marked_constant is True
    assert _dispatch._resolved_name._dynamo_marked_constant is True


def test_version_has_one_source(capsys):
    with pytest.raises(SystemExit) as exit:
        cli(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"sr3fast {sr3fast.__version__}"
    built = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True,
                           check=True, cwd=ROOT, env={**os.environ, "SR3FAST_SKIP_EXT": "1"})
    assert built.stdout.strip().splitlines()[-1] == sr3fast.__version__


# ---------------------------------------------------------------- exit status

def test_help_documents_the_exit_status():
    text = build_parser().format_help()
    assert "exit status" in text and "2  nothing was run" in text


def test_missing_inputs_and_bad_models_share_one_exit_status(photo, tmp_path, capsys):
    assert _upscale(tmp_path / "absent.png", tmp_path / "o.png") == EXIT_USAGE
    assert "absent.png" in _no_traceback(capsys)
    assert cli(["upscale", str(photo), "-o", str(tmp_path / "o.png"), "--model", "nope"]) == EXIT_USAGE
    assert "preset" in _no_traceback(capsys)
    assert _upscale(photo, tmp_path / "o.png", "--steps", "0") == EXIT_USAGE
    assert "--steps" in _no_traceback(capsys)
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


# ---------------------------------------------------------------- devices and memory

def test_unknown_device_name_is_a_usage_error(photo, tmp_path, capsys):
    assert _upscale(photo, tmp_path / "o.png", "--device", "gpu0") == EXIT_USAGE
    err = _no_traceback(capsys)
    assert "'gpu0' is not a device name" in err and "cuda" in err
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


def test_cuda_on_a_machine_without_a_gpu_is_a_usage_error(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _upscale(photo, tmp_path / "o.png", "--device", "cuda") == EXIT_USAGE
    assert "no cuda device is available" in _no_traceback(capsys)
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


def test_a_gpu_index_beyond_the_machine_is_a_usage_error(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _upscale(photo, tmp_path / "o.png", "--device", "cuda:3") == EXIT_USAGE
    assert "1 cuda device(s), cuda:0 to cuda:0" in _no_traceback(capsys)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB"),
                                   RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_says_what_to_do_and_writes_nothing(error, photo, tmp_path, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(api, "upscale", exhausted)
    assert _upscale(photo, tmp_path / "out") == EXIT_FAILED
    err = _no_traceback(capsys)
    assert "out of memory" in err and "smaller image" in err and "in.png" in err
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


# ---------------------------------------------------------------- models

def test_model_folder_from_sr3fast_train(photo, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_20").mkdir(parents=True)
    (run / "checkpoints" / "step_100").mkdir()
    sr3fast.save(sr3fast.load("tiny", seed=0), run / "checkpoints" / "step_100" / "model.safetensors")
    out = tmp_path / "out.png"
    args = ["upscale", str(photo), "-o", str(out), "--steps", "1", "-q", "--model", str(run)]
    assert cli(args) == EXIT_USAGE                                   # the run has not finished
    err = _no_traceback(capsys)
    assert "without model.safetensors" in err and str(Path("step_100", "model.safetensors")) in err
    assert not out.exists()

    sr3fast.save(sr3fast.load("tiny", seed=0), run / "model.safetensors")
    assert cli(args) == EXIT_OK
    assert Image.open(out).size == (16, 16)


def test_a_bad_model_leaves_no_output_folder(photo, tmp_path, capsys):
    (tmp_path / "bad").write_text("not a checkpoint")
    out = tmp_path / "newdir"
    assert cli(["upscale", str(photo), "-o", str(out), "--model", str(tmp_path / "bad")]) == EXIT_USAGE
    assert not out.exists()
    assert "cannot load model" in _no_traceback(capsys)


def test_an_unreadable_only_input_leaves_no_output_folder(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "newdir"
    assert _upscale(tmp_path / "broken.png", out) == EXIT_FAILED
    assert "broken.png" in _no_traceback(capsys)
    assert not out.exists()


def test_a_folder_run_goes_on_past_an_unreadable_image(photo, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a_broken.png").write_bytes(b"not a png")
    photo.rename(folder / "b.png")
    assert _upscale(folder, tmp_path / "out") == EXIT_FAILED
    assert "a_broken.png" in _no_traceback(capsys)
    assert sorted(os.listdir(tmp_path / "out")) == ["b.png"]


def _nan_checkpoint(tmp_path) -> Path:
    model = sr3fast.load("tiny", seed=0)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    return sr3fast.save(model, tmp_path / "nan.safetensors")


def test_a_nan_weight_is_refused_not_written_as_a_black_image(photo, tmp_path, capsys):
    checkpoint = _nan_checkpoint(tmp_path)
    with pytest.raises(FloatingPointError, match="weights hold NaN or Inf"):
        sr3fast.upscale(torch.rand(1, 3, 4, 4), model=sr3fast.load(checkpoint), steps=2, progress=False)
    out = tmp_path / "out.png"
    assert cli(["upscale", str(photo), "-o", str(out), "--model", str(checkpoint), "--steps", "2", "-q"]) \
        == EXIT_FAILED
    assert "NaN" in _no_traceback(capsys)
    assert not out.exists()


# ---------------------------------------------------------------- --dtype, --seed, --eta

def _model_dtypes(monkeypatch) -> list:
    """Records the weights' dtype of every model the CLI upscales with."""
    seen, real = [], api.upscale

    def recording(x, model=None, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return real(x, model=model, **kwargs)

    monkeypatch.setattr(api, "upscale", recording)
    return seen


def test_dtype_runs_the_model_in_that_precision(photo, tmp_path, monkeypatch):
    seen = _model_dtypes(monkeypatch)
    assert _upscale(photo, tmp_path / "bf16.png", "--dtype", "bfloat16", "--seed", "0") == EXIT_OK
    assert seen == [torch.bfloat16]
    assert Image.open(tmp_path / "bf16.png").size == (16, 16)


def test_a_half_precision_checkpoint_runs_in_float32_on_the_cpu(photo, tmp_path, monkeypatch):
    checkpoint = sr3fast.save(sr3fast.load("tiny", seed=0), tmp_path / "half.safetensors",
                              dtype=torch.float16)
    seen = _model_dtypes(monkeypatch)
    assert cli(["upscale", str(photo), "-o", str(tmp_path / "o.png"), "--model", str(checkpoint),
                "--steps", "1", "-q"]) == EXIT_OK
    assert seen == [torch.float32]


def test_a_preset_with_a_seed_gives_the_same_image_twice(photo, tmp_path):
    for name in ("first.png", "second.png"):
        assert _upscale(photo, tmp_path / name, "--seed", "3") == EXIT_OK
    assert (tmp_path / "first.png").read_bytes() == (tmp_path / "second.png").read_bytes()


def test_preset_weights_come_from_the_seed_without_touching_the_global_rng():
    state = torch.get_rng_state()
    first, second, other = (sr3fast.load("tiny", seed=s).state_dict() for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_eta_reaches_ddim(tmp_path):
    model, x = sr3fast.load("tiny", seed=0), torch.rand(1, 3, 4, 4)
    deterministic, noisy = (sr3fast.upscale(x, model=model, sampler="ddim", eta=eta, steps=3, seed=0,
                                            progress=False) for eta in (0.0, 1.0))
    assert not torch.equal(deterministic, noisy)
    assert torch.equal(deterministic, sr3fast.upscale(x, model=model, sampler="ddim", steps=3, seed=0,
                                                      progress=False))


def test_eta_with_another_sampler_is_refused(photo, tmp_path, capsys):
    with pytest.raises(ValueError, match="eta is the noise scale of ddim and dpmpp_2m_sde.*'posterior'"):
        sr3fast.upscale(torch.rand(1, 3, 4, 4), model=sr3fast.load("tiny"), sampler="posterior", eta=0.5,
                        steps=1, progress=False)
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        sr3fast.upscale(torch.rand(1, 3, 4, 4), model=sr3fast.load("tiny"), sampler="ddim", eta=2.0,
                        steps=1, progress=False)
    out = tmp_path / "out.png"
    assert _upscale(photo, out, "--sampler", "posterior", "--eta", "0.5") == EXIT_USAGE
    assert "'ddim'" in _no_traceback(capsys)
    assert not out.exists()
    assert _upscale(photo, out, "--sampler", "ddim", "--eta", "0.5") == EXIT_OK


# ---------------------------------------------------------------- backends

def test_cpu_attention_has_the_cpu_backends_kernel():
    """The cpu backend's attention is its own (torch's fused CPU kernel, no L x L scores), not a
    fallback to the reference: `sr3fast backends` says so on the attention line."""
    from sr3fast import backends

    if backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the compiled extension is not built")
    attention = next(line for line in sr3fast.explain_backend("cpu").splitlines() if "attention" in line)
    assert "-> cpu" in attention and "reference" not in attention


# ---------------------------------------------------------------- folders and processes
# (runs over folder trees, batching and torchrun: tests/test_folders.py)

def test_help_shows_the_folder_options_and_torchrun():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["upscale"].format_help().split())
    assert "--skip-existing" in text and "--batch-size" in text
    assert "torchrun --standalone --nproc_per_node N -m sr3fast upscale DIR -o OUT" in text


def test_device_auto_is_the_default_and_takes_the_cpu_without_a_gpu(photo, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen, real = [], api.upscale

    def recording(x, model=None, **kwargs):
        seen.append(next(model.parameters()).device)
        return real(x, model=model, **kwargs)

    monkeypatch.setattr(api, "upscale", recording)
    assert _upscale(photo, tmp_path / "auto.png", "--device", "auto") == EXIT_OK
    assert _upscale(photo, tmp_path / "default.png") == EXIT_OK
    assert seen == [torch.device("cpu")] * 2


def test_bad_batch_sizes_and_process_layouts_are_usage_errors(photo, tmp_path, capsys, monkeypatch):
    assert _upscale(photo, tmp_path / "o.png", "--batch-size", "0") == EXIT_USAGE
    assert "--batch-size must be at least 1" in _no_traceback(capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    assert _upscale(photo, tmp_path / "o.png") == EXIT_USAGE
    assert "torchrun" in _no_traceback(capsys)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _upscale(photo, tmp_path / "o.png") == EXIT_USAGE       # a preset, no --seed: weights differ
    assert "pass --seed" in _no_traceback(capsys)
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


def test_a_single_image_gets_the_seed_itself(photo, tmp_path):
    """`sr3fast upscale photo.png -o x.png --seed S` is sr3fast.upscale(photo, seed=S)."""
    assert _upscale(photo, tmp_path / "cli.png", "--seed", "5") == EXIT_OK
    expected = sr3fast.upscale(photo, model=sr3fast.load("tiny", seed=5), steps=2, seed=5, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png")), np.asarray(expected))


# ---------------------------------------------------------------- tiling and --scale

@pytest.fixture
def wide_photo(tmp_path):
    """An 8x12 RGB image: 32x48 out of the tiny preset, several tiles of 4 pixels."""
    return _random_photo(tmp_path / "wide.png", 8, 12, seed=1)


def test_tile_options_reach_upscale(wide_photo, tmp_path):
    """--tile N --tile-overlap K and --max-memory are upscale's tile=, tile_overlap=, max_memory=:
    the file is what the API gives with them, and not what it gives untiled (a tiled canvas at
    random weights differs), so a flag dropped on the way would show."""
    model = sr3fast.load("tiny", seed=2)
    tile = 2 * model.size_multiple
    assert _upscale(wide_photo, tmp_path / "t.png", "--seed", "2", "--tile", str(tile),
                    "--tile-overlap", str(tile // 4), "--max-memory", "2GiB") == EXIT_OK
    expected = sr3fast.upscale(wide_photo, model=model, steps=2, seed=2, progress=False, tile=tile,
                               tile_overlap=tile // 4, max_memory=2 * 2**30)
    untiled = sr3fast.upscale(wide_photo, model=model, steps=2, seed=2, progress=False, tile=False)
    written = np.asarray(Image.open(tmp_path / "t.png"))
    assert np.array_equal(written, np.asarray(expected))
    assert not np.array_equal(written, np.asarray(untiled))


def test_scale_runs_the_model_twice(photo, tmp_path):
    """--scale 16 with a 4x model: 4x4 -> 64x64, the cascade upscale(scale=16) makes."""
    assert _upscale(photo, tmp_path / "s.png", "--seed", "1", "--scale", "16") == EXIT_OK
    expected = sr3fast.upscale(photo, model=sr3fast.load("tiny", seed=1), steps=2, seed=1, scale=16,
                               progress=False)
    written = Image.open(tmp_path / "s.png")
    assert written.size == (64, 64)
    assert np.array_equal(np.asarray(written), np.asarray(expected))


@pytest.mark.parametrize("flags,message", [
    (["--tile", "off", "--max-memory", "1GiB"], "--tile off samples untiled"),
    (["--tile", "13"], "multiple of the model's size_multiple"),   # tiny's is 2
    (["--tile", "64", "--tile-overlap", "64"], "tile_overlap must be an integer in [0, tile=64)"),
    (["--scale", "8"], "not a power of this model's factor 4"),
])
def test_bad_tiling_and_scale_are_usage_errors_before_anything_is_written(flags, message, photo, tmp_path,
                                                                          capsys):
    assert _upscale(photo, tmp_path / "o.png", *flags) == EXIT_USAGE
    assert message in _no_traceback(capsys)
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


@pytest.mark.parametrize("flags", [["--tile", "0"], ["--tile", "big"], ["--max-memory", "lots"]])
def test_unparseable_tiling_flags_are_refused_by_the_parser(flags, photo, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _upscale(photo, tmp_path / "o.png", *flags)
    assert exit_.value.code == 2
    assert "must be" in capsys.readouterr().err
