"""`sr3fast eval` and sr3fast.evaluation: metrics against independent implementations, the
degradation against PIL, the sharpness measure in closed form, the report, the grid, atomic
writes and the command line's errors."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sr3fast
from sr3fast import evaluation
from sr3fast.cli import main as cli
from sr3fast.evaluation import (GRID_GAP, degrade, evaluate_images, find_images, image_metrics,
                                sharpness, sharpness_ratio)

skimage_data = pytest.importorskip("skimage.data")
skimage_metrics = pytest.importorskip("skimage.metrics")

SCALE = 4                  # the tiny preset: 4 -> 16
STEPS = 2


def astronaut() -> np.ndarray:
    """A real photograph: scikit-image's bundled astronaut (NASA, public domain), (512, 512, 3)."""
    return skimage_data.astronaut()


def to_batch(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float() / 255


def to_hwc(batch: torch.Tensor) -> np.ndarray:
    return batch[0].permute(1, 2, 0).double().numpy()


def write_photos(folder: Path) -> list[Path]:
    """Two astronaut crops: 34x33 (cropped to 32x32 by eval) and 48 high x 40 wide, in a subfolder
    (eval searches folders recursively)."""
    (folder / "sub").mkdir(parents=True)
    image = astronaut()
    paths = [folder / "a.png", folder / "sub" / "b.png"]
    Image.fromarray(image[:34, :33]).save(paths[0])
    Image.fromarray(image[200:248, 200:240]).save(paths[1])
    return paths


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return sr3fast.load("tiny")


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory):
    """(report, paths): the tiny model evaluated on the two photos, pictures kept."""
    folder = tmp_path_factory.mktemp("photos")
    paths = write_photos(folder)
    report = evaluate_images(tiny, find_images([folder]), steps=STEPS, seed=3, progress=False,
                             keep_images=True, model_name="tiny")
    return report, paths


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return skimage_metrics.structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=False, data_range=1.0)


# ---------------------------------------------------------------- metrics against references

def test_psnr_and_ssim_match_scikit_image(evaluated, tiny):
    report, paths = evaluated
    assert [r.name for r in report.images] == [str(p) for p in paths]
    for record, path in zip(report.images, paths):
        # the ground truth eval compared against is the file, cropped from the top-left
        pixels = np.asarray(Image.open(path).convert("RGB"))
        height, width = pixels.shape[0] // SCALE * SCALE, pixels.shape[1] // SCALE * SCALE
        assert (record.height, record.width) == (height, width)
        truth = pixels[:height, :width].astype(np.float64) / 255
        np.testing.assert_array_equal(to_hwc(record.pictures["ground_truth"]), truth.astype(np.float32))
        # the SR3 output is upscale's, with the seed and steps asked for, rounded to 8 bits
        direct = sr3fast.upscale(record.pictures["low"], model=tiny, steps=STEPS, seed=3, progress=False)
        torch.testing.assert_close(record.pictures["sr3"], (direct * 255).round() / 255, rtol=0, atol=0)
        for method in ("sr3", "bicubic"):
            output = to_hwc(record.pictures[method])
            expected_psnr = skimage_metrics.peak_signal_noise_ratio(truth, output, data_range=1.0)
            expected_ssim = skimage_ssim(truth, output)
            values = getattr(record, method)
            print(record.name, method, values)
            assert values["psnr"] == pytest.approx(expected_psnr, abs=1e-6)
            assert values["ssim"] == pytest.approx(expected_ssim, abs=1e-6)
    # a random-weight model is far worse than bicubic on a real photo; bicubic is decent
    assert all(r.bicubic["psnr"] > 20 and r.bicubic["psnr"] > r.sr3["psnr"] for r in report.images)


def test_consistency_matches_independent_computation(evaluated):
    report, _ = evaluated
    for record in report.images:
        low = record.pictures["low"]
        h, w = low.shape[-2:]
        for method in ("bicubic", "sr3"):          # bicubic: the output IS the input upsampled
            output = record.pictures[method]
            # PIL, in float (float32 arrays open in "F" mode: no 8-bit rounding): its bicubic kernel with antialiasing
            down = np.stack([np.asarray(Image.fromarray(output[0, c].numpy()).resize((w, h), Image.BICUBIC))
                             for c in range(3)]).astype(np.float64).clip(0, 1)
            expected_pil = ((down - low[0].double().numpy()) ** 2).mean()
            # torch, written out here
            down_torch = F.interpolate(output.double(), size=(h, w), mode="bicubic", align_corners=False,
                                       antialias=True).clamp(0, 1)
            expected_torch = (down_torch - low.double()).square().mean().item()
            value = getattr(record, method)["consistency"]
            print(record.name, method, value, expected_pil, expected_torch)
            assert value == pytest.approx(expected_pil, rel=1e-5)
            assert value == pytest.approx(expected_torch, rel=1e-12)
        # bicubic upsampling nearly inverts the downsampling; random SR3 weights do not
        assert 0 < record.bicubic["consistency"] < 1e-3 < record.sr3["consistency"]


def test_the_ground_truth_as_output_is_consistent_to_8_bit_rounding():
    truth = to_batch(astronaut()[100:164, 150:214])
    low = degrade(truth, SCALE)
    (metrics,) = image_metrics(truth, truth, low)
    # the only difference is rounding the input to 8 bits: at most half a level per value
    assert 0 < metrics["consistency"] <= (0.5 / 255) ** 2
    assert math.isinf(metrics["psnr"]) and metrics["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["sharpness_ratio"] == 1.0
    (exact,) = image_metrics(truth, truth, degrade(truth, SCALE, round_to_8_bits=False))
    assert exact["consistency"] < 1e-13          # float32 rounding of the input only


# ---------------------------------------------------------------- sharpness

def rgb(plane: np.ndarray, colour=(1.0, 1.0, 1.0)) -> torch.Tensor:
    return torch.stack([torch.from_numpy(plane).double() * c for c in colour])[None]


def test_sharpness_in_closed_form():
    # 0/1 checkerboard: the Laplacian is -4 on ones and +4 on zeros
    board = (np.indices((8, 9)).sum(0) % 2).astype(np.float64)
    assert sharpness(rgb(board)).item() == pytest.approx(16.0, rel=1e-12)
    # a unit impulse in the middle of 5x5: 'valid' Laplacian is 3x3 holding -4 and four 1s
    impulse = np.zeros((5, 5))
    impulse[2, 2] = 1
    assert sharpness(rgb(impulse)).item() == pytest.approx(20 / 9, rel=1e-12)
    # the luminance weights: a pure red / green / blue impulse
    for colour, weight in (((1, 0, 0), 0.299), ((0, 1, 0), 0.587), ((0, 0, 1), 0.114)):
        assert sharpness(rgb(impulse, colour)).item() == pytest.approx(weight ** 2 * 20 / 9, rel=1e-12)
    # 'valid' borders: an impulse at a corner touches no valid Laplacian; on an edge, one (value 1)
    corner, edge = np.zeros((5, 5)), np.zeros((5, 5))
    corner[0, 0], edge[0, 2] = 1, 1
    assert sharpness(rgb(corner)).item() == 0
    assert sharpness(rgb(edge)).item() == pytest.approx(1 / 9, rel=1e-12)
    assert sharpness(torch.full((1, 3, 6, 7), 0.3)).item() == pytest.approx(0, abs=1e-20)


def test_sharpness_matches_numpy_and_is_batched():
    images = torch.rand(2, 3, 9, 12, generator=torch.Generator().manual_seed(0))
    luma = (images.double().numpy() * np.array([0.299, 0.587, 0.114])[None, :, None, None]).sum(1)
    lap = (luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:]
           - 4 * luma[:, 1:-1, 1:-1])
    result = sharpness(images)
    assert result.dtype == torch.float64 and result.shape == (2,)
    np.testing.assert_allclose(result.numpy(), (lap ** 2).mean(axis=(1, 2)), rtol=1e-12)
    with pytest.raises(ValueError, match="3x3"):
        sharpness(torch.rand(1, 3, 2, 9))


def test_sharpness_ratio_orders_blur_truth_and_noise():
    truth = to_batch(astronaut()[100:164, 150:214])
    assert sharpness_ratio(truth, truth).item() == 1.0
    bicubic = evaluation.bicubic_upscale(degrade(truth, SCALE), SCALE)
    blurred = sharpness_ratio(bicubic, truth).item()
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(0)) * 0.05
    noisy = sharpness_ratio((truth + noise).clamp(0, 1), truth).item()
    print(f"bicubic {blurred:.3f}, noisy {noisy:.3f}")
    assert blurred < 0.5 and noisy > 1.5
    flat = torch.full((1, 3, 5, 5), 0.5)
    assert sharpness_ratio(flat, flat).item() == 1.0
    assert math.isinf(sharpness_ratio(rgb(np.eye(5)).float(), flat).item())


# ---------------------------------------------------------------- the degradation

def test_degrade_is_pil_bicubic_after_a_top_left_crop():
    image = astronaut()[50:116, 300:363]                          # 66 x 63 -> cropped to 64 x 60
    low = degrade(to_batch(image), SCALE)
    assert low.shape == (1, 3, 16, 15)
    expected = np.asarray(Image.fromarray(image[:64, :60]).resize((15, 16), Image.BICUBIC)) / 255
    difference = np.abs(to_hwc(low) - expected).max()
    print(f"max difference from PIL: {difference * 255:.3f} levels")
    assert difference <= 1 / 255 + 1e-6
    assert torch.equal(low, degrade(to_batch(image[:64, :60]), SCALE))   # the crop is top-left
    assert torch.equal(low, (low * 255).round() / 255)                    # 8-bit values


# ---------------------------------------------------------------- end to end

def test_cli_end_to_end_json_and_grid(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos")
    out_json, out_grid = tmp_path / "eval.json", tmp_path / "grid.png"
    assert cli(["eval", str(tmp_path / "photos"), "--model", "tiny", "--steps", str(STEPS), "--seed", "1",
                "--json", str(out_json), "--grid", str(out_grid), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "mean (2)" in printed
    assert sorted(os.listdir(tmp_path)) == ["eval.json", "grid.png", "photos"]

    result = json.loads(out_json.read_text())
    assert set(result) >= {"model", "settings", "images", "mean"}
    assert result["model"] == "tiny"
    settings = result["settings"]
    assert {k: settings[k] for k in ("steps", "seed", "scale", "device")} == \
        {"steps": STEPS, "seed": 1, "scale": SCALE, "device": "cpu"}
    assert isinstance(settings["sampler"], str)
    metrics = {"psnr", "ssim", "consistency", "sharpness_ratio", "seconds"}
    assert [(i["name"], i["height"], i["width"]) for i in result["images"]] == \
        [(str(photos[0]), 32, 32), (str(photos[1]), 48, 40)]
    for record in result["images"]:
        for method in ("sr3", "bicubic"):
            assert set(record[method]) == metrics
            assert all(math.isfinite(v) for v in record[method].values())
            assert record[method]["seconds"] >= 0
        assert record["bicubic"]["sharpness_ratio"] < 1
    for method in ("sr3", "bicubic"):
        for metric in metrics:
            values = [record[method][metric] for record in result["images"]]
            assert result["mean"][method][metric] == pytest.approx(sum(values) / len(values), rel=1e-12)

    # the grid: rows of 4 pictures 32 px wide + gaps; the 40x48 image is scaled to 32 wide (38 high)
    grid = np.asarray(Image.open(out_grid).convert("RGB"))
    width, row2 = 32 + GRID_GAP, round(48 * 32 / 40) + GRID_GAP
    assert grid.shape == (32 + GRID_GAP + row2, 4 * width, 3)
    truth = np.asarray(Image.open(photos[0]).convert("RGB"))[:32, :32]
    np.testing.assert_array_equal(grid[:32, 3 * width:3 * width + 32], truth)        # ground truth
    low = np.asarray(Image.fromarray(truth).resize((8, 8), Image.BICUBIC)).astype(int)
    enlarged = grid[:32, :32].astype(int)
    assert np.abs(enlarged[::4, ::4] - low).max() <= 1                             # nearest-enlarged input
    assert (enlarged == np.repeat(np.repeat(enlarged[::4, ::4], 4, 0), 4, 1)).all()
    assert (grid[:, 32:34] == 255).all() and (grid[32:34] == 255).all()              # white gaps


def test_cli_without_model_uses_the_default_or_says_why_not(tmp_path, capsys, monkeypatch, tiny):
    write_photos(tmp_path / "photos")
    from sr3fast import api

    def broken(source, **kwargs):
        assert source == "default"
        raise RuntimeError("weights are being trained")

    monkeypatch.setattr(api, "load", broken)
    assert cli(["eval", str(tmp_path / "photos"), "--json", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert "sr3fast eval: error:" in err and "default model" in err and "weights are being trained" in err
    assert "Traceback" not in err and not (tmp_path / "e.json").exists()

    monkeypatch.setattr(api, "load", lambda source, **kwargs: tiny if source == "default" else None)
    assert cli(["eval", str(tmp_path / "photos"), "--steps", "1", "--json", str(tmp_path / "e.json"), "-q"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["model"] == "default"


# ---------------------------------------------------------------- atomic writes

def test_write_json_is_atomic(evaluated, tmp_path, monkeypatch):
    report, _ = evaluated
    target = tmp_path / "eval.json"
    target.write_text("previous results")

    def half_then_fail(self, text, *args, **kwargs):
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        evaluation.write_json(report, target)
    monkeypatch.undo()
    assert target.read_text() == "previous results"
    assert os.listdir(tmp_path) == ["eval.json"]
    evaluation.write_json(report, target)
    assert json.loads(target.read_text())["images"][0]["name"] == report.images[0].name


def test_grid_and_json_are_written_all_or_nothing(tmp_path, monkeypatch, capsys):
    write_photos(tmp_path / "photos")
    out_json, out_grid = tmp_path / "eval.json", tmp_path / "grid.png"
    out_json.write_text("previous results")

    def partial_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half an image")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", partial_save)
    assert cli(["eval", str(tmp_path / "photos"), "--model", "tiny", "--steps", "1", "--json", str(out_json),
                "--grid", str(out_grid), "-q"]) == 2
    err = capsys.readouterr().err
    assert "sr3fast eval: error:" in err and "disk full" in err and "nothing was written" in err
    assert out_json.read_text() == "previous results"
    assert sorted(os.listdir(tmp_path)) == ["eval.json", "photos"]      # no grid, no temporary files


# ---------------------------------------------------------------- bad inputs

def bad_input_case(tmp_path, name: str) -> tuple[str, str]:
    """(the input to pass, a phrase the error must contain)."""
    if name == "empty folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("not an image suffix")
        return str(tmp_path / "empty"), "holds no images"
    if name == "too small":
        Image.fromarray(astronaut()[:40, :11]).save(tmp_path / "small.png")      # 11 px wide < 12
        return str(tmp_path / "small.png"), "at least 12 px"
    if name == "corrupt":
        (tmp_path / "corrupt.png").write_bytes(b"these bytes are not an image")
        return str(tmp_path / "corrupt.png"), "cannot read"
    if name == "wrong suffix":
        (tmp_path / "photo.txt").write_text("text")
        return str(tmp_path / "photo.txt"), "not an image file"
    return str(tmp_path / "missing.png"), "does not exist"


@pytest.mark.parametrize("case", ["empty folder", "too small", "corrupt", "wrong suffix", "missing path"])
def test_bad_inputs_fail_clearly_and_write_nothing(case, tmp_path, capsys):
    source, phrase = bad_input_case(tmp_path, case)
    before = sorted(os.listdir(tmp_path))
    code = cli(["eval", source, "--model", "tiny", "--steps", "1", "--json", str(tmp_path / "e.json"),
                "--grid", str(tmp_path / "g.png"), "-q"])
    err = capsys.readouterr().err
    print(err)
    assert code != 0
    assert err.startswith("sr3fast eval: error:") and phrase in err and "Traceback" not in err
    if case != "empty folder":
        assert Path(source).name in err                                   # the file is named
    assert sorted(os.listdir(tmp_path)) == before


def test_bad_files_are_caught_before_sampling(tmp_path, tiny, monkeypatch):
    # a bad file late in the list fails the run before the first image is sampled
    write_photos(tmp_path / "photos")
    (tmp_path / "photos" / "z_corrupt.png").write_bytes(b"nope")
    Image.fromarray(astronaut()[:11, :40]).save(tmp_path / "photos" / "z_small.png")
    from sr3fast import api
    monkeypatch.setattr(api, "upscale", lambda *a, **k: pytest.fail("sampled before checking the inputs"))
    with pytest.raises(ValueError) as caught:
        evaluate_images(tiny, find_images([tmp_path / "photos"]), steps=1, progress=False)
    assert "z_corrupt.png" in str(caught.value) and "z_small.png" in str(caught.value)


def test_find_images_recurses_and_skips_hidden_files(tmp_path):
    write_photos(tmp_path)
    (tmp_path / ".hidden.png").write_bytes(b"resource fork")
    (tmp_path / "sub" / "readme.md").write_text("x")
    assert find_images([tmp_path, tmp_path / "a.png"]) == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    assert evaluation.minimum_side(4) == 12 and evaluation.minimum_side(8) == 16 \
        and evaluation.minimum_side(16) == 16 and evaluation.minimum_side(2) == 12
