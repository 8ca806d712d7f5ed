"""Training (sr3fast.train): data, metrics, the trainer, checkpoints, resume, DDP, CLI.

Real photos (scikit-image's bundled public-domain images) written to a temporary folder, the
`tiny` preset (4 -> 16), CPU, a few steps per run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sr3fast
from sr3fast.checkpoint import read_checkpoint
from sr3fast.train import TrainConfig, train
from sr3fast.train import checkpoints
from sr3fast.train.data import (Augment, CropPairs, DataError, PreparedPairs, open_folder, quantize,
                                resize, to_condition)
from sr3fast.train.metrics import consistency, psnr, ssim
from sr3fast.train.order import TrainingOrder

from support import fp32_atol

skimage_data = pytest.importorskip("skimage.data")
skimage_metrics = pytest.importorskip("skimage.metrics")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny model is far too small for two threads to help, and other work shares the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Six real photos, one saved as JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    for index, name in enumerate(PHOTOS):
        image = Image.fromarray(getattr(skimage_data, name)())
        image.save(folder / (f"{name}.jpg" if index == 1 else f"{name}.png"))
    return folder


def tiny_config(data: Path, out: Path, **options) -> TrainConfig:
    settings = dict(data=str(data), out=str(out), preset="tiny", steps=4, batch=4, warmup=2,
                    log_every=1, val_every=0, save_every=1000, workers=0, progress=False, device="cpu")
    settings.update(options)
    return TrainConfig(**settings)


def losses(records: list[dict]) -> list[float]:
    return [record["loss"] for record in records]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- metrics against scikit-image -------------------------------------------------------------

def _photo_batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of two photos and noisy, shifted versions of them, in [0, 1]."""
    crops = [torch.from_numpy(getattr(skimage_data, name)()[:size, 100:100 + size].copy())
             for name in ("astronaut", "coffee")]
    clean = torch.stack(crops).permute(0, 3, 1, 2).double() / 255
    generator = torch.Generator().manual_seed(0)
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=generator, dtype=torch.float64)
             + 0.02).clamp(0, 1)
    return clean, noisy


def test_psnr_matches_scikit_image():
    clean, noisy = _photo_batch()
    ours = psnr(noisy, clean)
    for i in range(len(clean)):
        theirs = skimage_metrics.peak_signal_noise_ratio(clean[i].numpy(), noisy[i].numpy(), data_range=1.0)
        print(f"psnr image {i}: ours {ours[i].item():.12f}, scikit-image {theirs:.12f}")
        assert ours[i].item() == pytest.approx(theirs, rel=1e-12)
    assert psnr(clean, clean).isinf().all()


@pytest.mark.parametrize("size", [11, 23, 64])
def test_ssim_matches_scikit_image(size):
    clean, noisy = _photo_batch(64)
    clean, noisy = clean[..., :size, :size], noisy[..., :size, :size]
    ours = ssim(noisy, clean)
    for i in range(len(clean)):
        theirs = skimage_metrics.structural_similarity(
            clean[i].permute(1, 2, 0).numpy(), noisy[i].permute(1, 2, 0).numpy(), data_range=1.0,
            channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        print(f"ssim {size}x{size} image {i}: ours {ours[i].item():.12f}, scikit-image {theirs:.12f}")
        assert ours[i].item() == pytest.approx(theirs, abs=1e-10)
    assert torch.allclose(ssim(clean, clean), torch.ones(len(clean), dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(clean[..., :10, :10], noisy[..., :10, :10])


def test_consistency_is_mse_after_downsampling():
    clean, _ = _photo_batch()
    output = 0.2 + 0.6 * clean                      # away from 0 and 1: no clamping below
    low = resize(output, (16, 16))
    assert consistency(output, low).abs().max().item() == 0
    shifted = consistency(output, low + 0.05)
    assert torch.allclose(shifted, torch.full_like(shifted, 0.05 ** 2), rtol=1e-9)


# --- data -------------------------------------------------------------------------------------

def test_low_resolution_input_is_pil_bicubic(photos):
    """The downsampling is bicubic with antialiasing, PIL's kernel (how the paper and the public
    code made their inputs). PIL's float mode has no 8-bit intermediate rounding, so the values
    agree to float32 rounding; the input is then rounded to 8 bits."""
    dataset = open_folder(photos, 16, 64, Augment(flip=False))
    low, high = dataset.validation_pair(0)
    pil = [np.asarray(Image.fromarray(channel.numpy(), mode="F").resize((16, 16), Image.BICUBIC))
           for channel in high]
    expected = torch.from_numpy(np.stack(pil)).clamp(0, 1)
    ours = resize(high[None], (16, 16))[0]
    print(f"max difference from PIL: {(ours - expected).abs().max().item():.2e}")
    assert torch.allclose(ours, expected, rtol=0, atol=1e-5)
    assert torch.equal(low, quantize(ours))


def test_pairs_are_reproducible_and_in_range(photos):
    dataset = open_folder(photos, 4, 16, Augment(blur=0.5))
    assert isinstance(dataset, CropPairs) and len(dataset) == len(PHOTOS)
    x, y0 = dataset[(2, 1234)]
    assert x.shape == y0.shape == (3, 16, 16)
    assert -1 <= x.min() and x.max() <= 1 and -1 <= y0.min() and y0.max() <= 1
    again = dataset[(2, 1234)]
    assert torch.equal(x, again[0]) and torch.equal(y0, again[1])
    other = dataset[(2, 99)]
    assert not torch.equal(y0, other[1]), "another sample seed must give another crop"


def test_condition_is_the_upsampled_input(photos):
    """Without augmentation, x is the bicubic upsampling (upscale's function) of the 8-bit
    downsampled target, and the blur changes only the input."""
    plain = open_folder(photos, 4, 16, Augment(flip=False))
    x, y0 = plain[(0, 7)]
    low = quantize(resize(((y0 + 1) / 2)[None], (4, 4)))
    assert torch.allclose(x, to_condition(low, 16)[0], atol=1e-6)
    blurred = open_folder(photos, 4, 16, Augment(flip=False, blur=1.0))
    xb, yb = blurred[(0, 7)]
    assert torch.equal(yb, y0) and not torch.equal(xb, x)


def test_prepared_layout_of_the_public_code(photos, tmp_path):
    for folder in ("hr_16", "lr_4", "sr_4_16"):
        (tmp_path / folder).mkdir()
    for name in PHOTOS[:3]:
        high = Image.open(next(photos.glob(f"{name}.*"))).convert("RGB").resize((16, 16), Image.BICUBIC)
        low = high.resize((4, 4), Image.BICUBIC)
        high.save(tmp_path / "hr_16" / f"{name}.png")
        low.save(tmp_path / "lr_4" / f"{name}.png")
        low.resize((16, 16), Image.BICUBIC).save(tmp_path / "sr_4_16" / f"{name}.png")
    Image.new("RGB", (12, 12)).save(tmp_path / "hr_16" / "wrong_size.png")
    Image.new("RGB", (3, 3)).save(tmp_path / "lr_4" / "wrong_size.png")
    dataset = open_folder(tmp_path, 4, 16, Augment(flip=False))
    assert isinstance(dataset, PreparedPairs) and len(dataset) == 3
    assert dict(dataset.images.skipped) == {"not 16x16": 1, "input not 4x4": 1}
    x, y0 = dataset[(1, 5)]
    name = PHOTOS[1]
    target = torch.from_numpy(np.asarray(Image.open(tmp_path / "hr_16" / f"{name}.png")).copy())
    low = torch.from_numpy(np.asarray(Image.open(tmp_path / "lr_4" / f"{name}.png")).copy())
    assert torch.allclose((y0 + 1) / 2 * 255, target.permute(2, 0, 1).float(), atol=1e-4)
    assert torch.allclose(x, to_condition(low.permute(2, 0, 1)[None].float() / 255, 16)[0], atol=1e-6)
    with pytest.raises(DataError, match="no hr_64/"):
        open_folder(tmp_path, 16, 64, Augment())


def test_unusable_images_are_skipped_and_counted(photos, tmp_path):
    Image.open(photos / "astronaut.png").save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    Image.new("RGB", (8, 40)).save(tmp_path / "narrow.png")
    (tmp_path / "notes.txt").write_text("ignored")
    dataset = open_folder(tmp_path, 4, 16, Augment())
    assert len(dataset) == 1
    assert dict(dataset.images.skipped) == {"unreadable": 1, "smaller than 16x16": 1}


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no images", "too small", "unreadable"])
def test_bad_data_folders_say_what_to_do(tmp_path, case):
    folder = tmp_path / "data"
    expected = {"missing": "does not exist", "file": "is a file", "empty": "is empty",
                "no images": "holds no images", "too small": "at least 16x16",
                "unreadable": "2 unreadable"}[case]
    if case == "file":
        folder.write_text("x")
    elif case != "missing":
        folder.mkdir()
    if case == "no images":
        (folder / "readme.md").write_text("x")
    if case == "too small":
        for i in range(2):
            Image.new("RGB", (15, 300)).save(folder / f"{i}.png")
    if case == "unreadable":
        for i in range(2):
            (folder / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    error = FileNotFoundError if case == "missing" else DataError
    with pytest.raises(error, match=expected):
        open_folder(folder, 4, 16, Augment())
    # and through the command line: a clear message, exit status 2, no traceback
    run = subprocess.run([sys.executable, "-m", "sr3fast.train", "--data", str(folder), "--out",
                          str(tmp_path / "out"), "--preset", "tiny", "--steps", "1"],
                         capture_output=True, text=True, cwd=REPO) if case == "too small" else None
    if run is not None:
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert expected in run.stderr


def test_order_is_sharded_and_resumable():
    """W processes with B/W each draw exactly the samples one process draws with B, and a
    resumed order continues where it stopped."""
    images, seed, batch, steps = 7, 3, 6, 5
    single = iter(TrainingOrder(images, seed, batch))
    per_step = [next(single) for _ in range(steps)]
    for world in (2, 3):
        ranks = [iter(TrainingOrder(images, seed, batch // world, rank=r, world_size=world))
                 for r in range(world)]
        for step in range(steps):
            shares = [next(rank) for rank in ranks]
            merged = [shares[i % world][i // world] for i in range(batch)]
            assert merged == per_step[step]
    resumed = iter(TrainingOrder(images, seed, batch, start=2 * batch))
    assert [next(resumed) for _ in range(steps - 2)] == per_step[2:]
    first_epoch = [key[0] for step in per_step for key in step][:images]
    assert sorted(first_epoch) == list(range(images)), "each epoch is a permutation"


# --- training ---------------------------------------------------------------------------------

def test_loss_falls_and_the_result_loads(photos, tmp_path):
    out = tmp_path / "run"
    records = train(tiny_config(photos, out, steps=30, batch=8, lr=2e-3, warmup=5, save_every=10, keep=2))
    values = losses(records)
    start, end = np.mean(values[:5]), np.mean(values[-5:])
    print(f"loss: first 5 steps {start:.4f}, last 5 steps {end:.4f}")
    assert end < 0.75 * start
    assert [r["step"] for r in read_log(out / "metrics.jsonl")] == list(range(1, 31))
    assert set(records[0]) == {"step", "loss", "lr", "images_per_s"}
    assert records[0]["lr"] == pytest.approx(2e-3 / 5) and records[-1]["lr"] == pytest.approx(2e-3)
    assert [step for step, _ in checkpoints.list_checkpoints(out / "checkpoints")] == [20, 30]
    model = sr3fast.load(out / "model.safetensors")
    config, _, meta = read_checkpoint(out / "checkpoints" / "step_00000030" / "model.safetensors")
    assert meta["weights"] == "ema" and meta["step"] == "30"
    image = sr3fast.upscale(torch.rand(1, 3, 4, 4), model=model, steps=3, seed=0, progress=False)
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_resume_continues_bit_identically(photos, tmp_path):
    """N steps straight vs N/2, stop, resume, N/2: the same loss at every step (CPU). Dropout is
    on (the RNG state must resume too), and the resumed half loads its data in worker
    processes, which must not change anything either."""
    options = dict(save_every=3, dropout=0.1)
    straight = losses(train(tiny_config(photos, tmp_path / "straight", steps=6, **options)))
    first = losses(train(tiny_config(photos, tmp_path / "resumed", steps=3, **options)))
    second = losses(train(tiny_config(photos, tmp_path / "resumed", steps=6, resume=True, workers=2,
                                      **options)))
    print("straight:", straight, "\nresumed: ", first + second)
    assert first + second == straight
    assert losses(read_log(tmp_path / "resumed" / "metrics.jsonl")) == straight
    ema = [read_checkpoint(tmp_path / run / "model.safetensors")[1] for run in ("straight", "resumed")]
    assert all(torch.equal(ema[0][key], ema[1][key]) for key in ema[0])


def test_resume_refuses_what_would_not_be_the_same_run(photos, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(photos, out, steps=2, save_every=2))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny_config(photos, out, steps=4))
    with pytest.raises(ValueError, match="batch: 4 -> 8"):
        train(tiny_config(photos, out, steps=4, batch=8, resume=True))
    assert train(tiny_config(photos, out, steps=2, resume=True)) == []


def test_resume_skips_a_damaged_checkpoint(photos, tmp_path):
    """A checkpoint damaged after it was written (disk error, hand edit) is passed over with a
    warning: the run resumes from the previous one and replaces the damaged one on its way."""
    out = tmp_path / "run"
    straight = losses(train(tiny_config(photos, out, steps=2, save_every=1)))
    state_file = out / "checkpoints" / checkpoints.folder_name(2) / checkpoints.STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="step_00000002.*cannot be read"):
        again = losses(train(tiny_config(photos, out, steps=2, save_every=1, resume=True)))
    assert again == straight[1:]
    assert checkpoints.load_state(state_file.parent)["step"] == 2


def test_regression_baseline_and_validation(photos, tmp_path):
    out = tmp_path / "regression"
    records = train(tiny_config(photos, out, mode="regression", lr=2e-3, steps=4, val_every=2,
                                holdout=2, val_images=2))
    assert all(np.isfinite(losses(records)))
    validation = read_log(out / "validation.jsonl")
    assert [v["step"] for v in validation] == [2, 4]
    for key in ("psnr", "ssim", "consistency", "bicubic_psnr", "bicubic_ssim"):
        assert np.isfinite(validation[-1][key])
    grid = Image.open(out / "samples" / "step_00000004.png")
    assert grid.size == (4 * (16 + 2), 2 * (16 + 2))  # input | bicubic | output | target, per image


def test_diffusion_validation_samples(photos, tmp_path):
    out = tmp_path / "diffusion"
    train(tiny_config(photos, out, steps=1, val_every=1, val_steps=3, val_images=1))
    (record,) = read_log(out / "validation.jsonl")
    assert record["sample_steps"] == 3 and record["images"] == 1 and np.isfinite(record["psnr"])


def test_bf16_and_accumulation(photos, tmp_path):
    """bf16 autocast stays near the fp32 losses; 2 micro-batches of 2 equal one batch of 4."""
    full = losses(train(tiny_config(photos, tmp_path / "fp32", steps=3)))
    accumulated = losses(train(tiny_config(photos, tmp_path / "accum", steps=3, accum=2)))
    bf16 = losses(train(tiny_config(photos, tmp_path / "bf16", steps=3, bf16=True)))
    print("fp32", full, "\naccum", accumulated, "\nbf16", bf16)
    # each loss is a mean over 4 x 3 x 16 x 16 terms; the split only reorders the sum
    assert np.allclose(accumulated, full, rtol=0, atol=3 * fp32_atol(4 * 3 * 16 * 16))
    # bf16 keeps 8 bits of mantissa: relative error 2^-8 per rounding
    assert np.allclose(bf16, full, rtol=0, atol=3 * 2 ** -8)
    assert bf16 != full, "autocast changed nothing: is it on?"


def test_compile_gives_the_eager_losses(photos, tmp_path):
    """torch.compile (AOT autograd, no code generation, so it runs in seconds on a CPU)."""
    eager = losses(train(tiny_config(photos, tmp_path / "eager", steps=2)))
    compiled = losses(train(tiny_config(photos, tmp_path / "compiled", steps=2, compile=True,
                                        compile_backend="aot_eager")))
    assert np.allclose(compiled, eager, rtol=0, atol=fp32_atol(4 * 3 * 16 * 16))


@pytest.mark.slow
def test_compile_with_inductor(photos, tmp_path, request):
    """Inductor generates and compiles C++ on a CPU: minutes here, so only when asked (-m slow)."""
    if "slow" not in (request.config.getoption("markexpr") or "").replace("not slow", ""):
        pytest.skip("minutes of C++ code generation on a CPU; select it with -m slow")
    eager = losses(train(tiny_config(photos, tmp_path / "eager", steps=2)))
    compiled = losses(train(tiny_config(photos, tmp_path / "compiled", steps=2, compile=True)))
    assert np.allclose(compiled, eager, rtol=0, atol=2 * fp32_atol(4 * 3 * 16 * 16))


def test_ddp_two_processes_match_one(photos, tmp_path):
    """torchrun with 2 gloo processes, batch 4 (2 each) vs one process with batch 4.

    Tolerance: each step's loss is a mean over 4 x 3 x 16 x 16 terms and DDP only changes the
    summation order of it and of the gradients (rank means, then their average), an fp32
    rounding difference of at most fp32_atol(n) per step; over k steps the weights can drift
    by that much once per step, hence k x fp32_atol(n). A sharding mistake (another image or
    noise for any sample) moves the loss by ~1e-2."""
    steps = 3
    single = losses(train(tiny_config(photos, tmp_path / "one", steps=steps)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "sr3fast.train", "--data", str(photos), "--out", str(tmp_path / "two"),
               "--preset", "tiny", "--steps", str(steps), "--batch", "4", "--warmup", "2",
               "--log-every", "1", "--val-every", "0", "--save-every", str(steps), "--workers", "0",
               "--device", "cpu", "-q"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    double = losses(read_log(tmp_path / "two" / "metrics.jsonl"))
    state = checkpoints.load_state(tmp_path / "two" / "checkpoints" / checkpoints.folder_name(steps))
    assert len(state["ranks"]) == 2, "the run was not distributed"
    tolerance = steps * fp32_atol(4 * 3 * 16 * 16)
    differences = np.abs(np.array(double) - np.array(single))
    print(f"one process {single}\ntwo processes {double}\nmax difference {differences.max():.2e}, "
          f"tolerance {tolerance:.2e}")
    assert len(double) == steps and differences.max() <= tolerance


# --- checkpoints survive kills ----------------------------------------------------------------

SAVER = """
import io, os, signal, sys, torch
from sr3fast.train import Trainer, TrainConfig
config = TrainConfig(data=sys.argv[1], out=sys.argv[2], preset="tiny", batch=4, warmup=2, workers=0,
                     progress=False, val_every=0, keep=2, resume=True, device="cpu")
trainer = Trainer(config)
if sys.argv[3] == "die-writing-state":
    real_save = torch.save
    def dying_save(obj, path):  # half the bytes reach the disk, then the process is killed
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(path, "wb") as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save
while True:
    trainer.step += 1
    trainer.save()
"""


def _check_every_checkpoint_loads(root: Path) -> int:
    """Every committed checkpoint reads completely; the newest step."""
    found = checkpoints.list_checkpoints(root)
    assert found, "no checkpoint left"
    for _, folder in found:
        model = sr3fast.load(folder / checkpoints.MODEL_FILE)
        sr3fast.load(folder / checkpoints.ONLINE_FILE)
        state = checkpoints.load_state(folder)
        assert state["step"] == int(folder.name.split("_")[1])
        assert model.config.low_res == 4
    return found[-1][0]


def test_a_kill_while_saving_loses_only_that_checkpoint(photos, tmp_path):
    root = tmp_path / "out" / "checkpoints"

    def saver(mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", SAVER, str(photos), str(tmp_path / "out"), mode],
                                cwd=REPO, stderr=subprocess.PIPE, text=True)

    def newest_step() -> int:
        found = checkpoints.list_checkpoints(root)
        return found[-1][0] if found else 0

    # a process that saves in a loop (resuming from the newest checkpoint), killed from outside
    newest = 0
    for delay in (0.0, 0.7):
        child = saver("loop")
        deadline = time.monotonic() + 240
        while newest_step() <= newest:
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the saver made no checkpoint"
            time.sleep(0.05)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        newer = _check_every_checkpoint_loads(root)
        assert newer > newest, "the next process resumed from an older checkpoint"
        newest = newer
        assert len(checkpoints.list_checkpoints(root)) <= 3  # keep=2, plus one committed before pruning

    # killed for certain in the middle of a save: trainer.pt half written
    child = saver("die-writing-state")
    child.wait(timeout=240)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert any(name.endswith(".partial") for name in leftovers), leftovers
    assert _check_every_checkpoint_loads(root) == newest
    resumed = train(tiny_config(photos, tmp_path / "out", steps=newest + 2, keep=2, resume=True,
                                save_every=1))
    assert [r["step"] for r in resumed] == [newest + 1, newest + 2]
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "leftovers were not removed"


def test_cli_has_train():
    from sr3fast.cli import build_parser

    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--preset", "tiny", "--bf16",
                                      "--compile", "--resume", "--lr", "3e-4", "--seed", "5"])
    from sr3fast.train.cli import config_from_args

    config = config_from_args(args)
    assert (config.bf16, config.compile, config.resume, config.lr, config.seed) == (True, True, True, 3e-4, 5)
