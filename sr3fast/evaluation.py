"""Evaluating a model on your own ground-truth images: `sr3fast eval`.

    from sr3fast.evaluation import evaluate_images, find_images, write_json, save_grid
    report = evaluate_images(sr3fast.load("default"), find_images(["photos/"]), steps=20, seed=0)
    print(report.table())
    write_json(report, "eval.json")

Each ground-truth image (RGB, 8 bits) is

1. cropped from the top-left to a multiple of the model's scale s = high_res // low_res
   (the right and bottom rows and columns beyond it are dropped);
2. degraded the way the paper made its inputs: bicubic downsampling with antialiasing (PIL's
   kernel) by s, rounded to 8 bits as a saved image would be (`degrade`);
3. super-resolved with `sr3fast.upscale`, and upsampled bicubically (the baseline); both outputs
   are rounded to 8 bits and timed (seconds per image);
4. compared with the ground truth: PSNR, SSIM, the paper's consistency and the sharpness ratio
   (`image_metrics`).

`save_grid` draws one row per image: input (enlarged by nearest neighbour) | bicubic | SR3 |
ground truth, every picture scaled to one width (the first image's, at most 256 px).

Every image is sampled with the same seed, so an image's result does not depend on which other
images are evaluated with it.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .atomic import atomic_path
from .images import IMAGE_SUFFIXES, read_image, save_image_atomic
from .train.data import quantize, resize
from .train.metrics import SSIM_WINDOW, consistency, psnr, ssim
from .train.validation import GRID_GAP

METHODS = ("sr3", "bicubic")
METRICS = ("psnr", "ssim", "consistency", "sharpness_ratio", "seconds")
LUMA = (0.299, 0.587, 0.114)            # ITU-R BT.601 luminance weights
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
GRID_MAX_WIDTH = 256                     # widest picture in a grid (pixels)
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# --- the degradation --------------------------------------------------------------------------

def model_scale(model) -> int:
    """The model's integer upscaling factor s = high_res // low_res."""
    high, low = model.config.high_res, model.config.low_res
    if high % low:
        raise ValueError(f"the model upscales {low}->{high}, not by an integer factor; "
                         "sr3fast eval needs an integer scale")
    return high // low


def minimum_side(scale: int) -> int:
    """The smallest image side `sr3fast eval` accepts at `scale`: the smallest multiple of the
    scale that is at least SSIM's window (11 px), so that after cropping to a multiple of the
    scale the low-resolution input has at least 1 px and the output at least 11 px per side."""
    return scale * math.ceil(SSIM_WINDOW / scale)


def crop_to_multiple(images: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C, H, W) cropped from the top-left to H and W rounded down to multiples of `scale`."""
    height, width = images.shape[-2] // scale * scale, images.shape[-1] // scale * scale
    if height == 0 or width == 0:
        raise ValueError(f"images of {images.shape[-2]}x{images.shape[-1]} px are smaller than the "
                         f"scale {scale}")
    return images[..., :height, :width]


def degrade(high: torch.Tensor, scale: int, round_to_8_bits: bool = True) -> torch.Tensor:
    """The paper's low-resolution input for ground truth `high` (B, 3, H, W) in [0, 1]: `high`
    cropped from the top-left to multiples of `scale` (`crop_to_multiple`), downsampled bicubically
    with antialiasing (PIL's kernel, `sr3fast.train.data.resize`) to (H // scale, W // scale), and
    rounded to 8 bits as a saved image would be (unless round_to_8_bits=False)."""
    high = crop_to_multiple(high, scale)
    low = resize(high, (high.shape[-2] // scale, high.shape[-1] // scale))
    return quantize(low) if round_to_8_bits else low


def bicubic_upscale(low: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline: `low` upsampled bicubically (antialiased, clamped) by `scale`, 8 bits."""
    return quantize(resize(low, (low.shape[-2] * scale, low.shape[-1] * scale)))


# --- the metrics ------------------------------------------------------------------------------

def sharpness(images: torch.Tensor) -> torch.Tensor:
    """High-frequency energy per image, (B,) float64: the mean square of the 3x3 Laplacian
    [[0, 1, 0], [1, -4, 1], [0, 1, 0]] of the luminance Y = 0.299 R + 0.587 G + 0.114 B, over
    the (H - 2) x (W - 2) pixels whose whole 3x3 neighbourhood lies inside the image ('valid'
    borders), computed in float64. Takes (B, 3, H, W) RGB in [0, 1] (values in other units scale
    the energy by the unit squared); H, W >= 3.

    A 0/1 checkerboard gives 16 (the Laplacian is +-4 everywhere); a constant image gives 0."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"sharpness: expected RGB images (B, 3, H, W), got {tuple(images.shape)}")
    if min(images.shape[-2:]) < 3:
        raise ValueError(f"sharpness: images of {images.shape[-2]}x{images.shape[-1]} px are smaller "
                         "than the 3x3 Laplacian")
    weights = torch.tensor(LUMA, dtype=torch.float64, device=images.device)
    luma = (images.double() * weights[:, None, None]).sum(1, keepdim=True)
    kernel = torch.tensor(LAPLACIAN, dtype=torch.float64, device=images.device)[None, None]
    return F.conv2d(luma, kernel).square().flatten(1).mean(1)


def sharpness_ratio(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sharpness(output) / sharpness(reference) per image, (B,) float64: 1 when the output has
    the ground truth's high-frequency energy; well below 1 for a blurry output (bicubic
    upsampling); above 1 for one with added noise or ringing. A flat reference (energy 0) gives 1
    for a flat output and inf otherwise."""
    if output.shape != reference.shape:
        raise ValueError(f"sharpness_ratio: expected two image batches of the same shape, got "
                         f"{tuple(output.shape)} and {tuple(reference.shape)}")
    energy, reference_energy = sharpness(output), sharpness(reference)
    ratio = energy / reference_energy
    flat = reference_energy == 0
    return torch.where(flat, torch.where(energy == 0, 1.0, math.inf).double(), ratio)


def image_metrics(output: torch.Tensor, ground_truth: torch.Tensor, low: torch.Tensor) -> list[dict]:
    """One dict per image of `output` (B, 3, H, W) against `ground_truth` (same shape), given the
    low-resolution input `low` it was made from: psnr (dB), ssim, consistency (MSE of the output
    downsampled to the input's size against the input, in [0, 1] units; the paper reports it
    x 1e-5) and sharpness_ratio, as Python floats."""
    values = {"psnr": psnr(output, ground_truth), "ssim": ssim(output, ground_truth),
              "consistency": consistency(output, low),
              "sharpness_ratio": sharpness_ratio(output, ground_truth)}
    return [{name: float(value[i]) for name, value in values.items()} for i in range(output.shape[0])]


# --- the images -------------------------------------------------------------------------------

def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files among `paths`: files named directly (they need an image suffix), and
    every file with an image suffix (IMAGE_SUFFIXES, any case) inside named folders, searched
    recursively, in sorted order; hidden files and folders (names starting with '.') are skipped.
    A file reached twice is listed once. Raises FileNotFoundError for a missing path and
    ValueError when no image is found."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not inside:
                raise ValueError(f"folder {str(path)!r} holds no images (looked for "
                                 f"{', '.join(IMAGE_SUFFIXES)} files, in subfolders too); pass a folder "
                                 "of ground-truth images")
            found.extend(inside)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{str(path)!r} is not an image file: its suffix is not one of "
                                 f"{', '.join(IMAGE_SUFFIXES)}")
            found.append(path)
        else:
            raise FileNotFoundError(f"{str(path)!r} does not exist; pass ground-truth image files or "
                                    "folders of them")
    if not found:
        raise ValueError("no ground-truth images given; pass image files or folders of them")
    unique, seen = [], set()
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def load_ground_truth(path: str | os.PathLike) -> torch.Tensor:
    """An image file as (1, 3, H, W) float32 RGB in [0, 1]. ValueError naming the file when it
    cannot be decoded."""
    try:
        image = read_image(path)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except _READ_ERRORS as err:
        message = str(err) if isinstance(err, ValueError) and str(path) in str(err) else \
            f"cannot read {str(path)!r} as an image ({err})"
        raise ValueError(message) from None
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return array.view(image.height, image.width, 3).permute(2, 0, 1)[None].float() / 255


def check_images(paths: Sequence[Path], scale: int) -> list[tuple[int, int]]:
    """Decode every image once and check its size before any sampling, so that a bad file fails
    the evaluation at once instead of after hours of sampling. Returns their (H, W); raises
    ValueError listing the unreadable and too-small files and what to do."""
    smallest = minimum_side(scale)
    sizes, unreadable, small = [], [], []
    for path in paths:
        try:
            image = load_ground_truth(path)
        except ValueError as err:
            unreadable.append(str(err))
            continue
        height, width = image.shape[-2:]
        sizes.append((height, width))
        if min(height, width) < smallest:
            small.append(f"{str(path)!r} ({width}x{height})")
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable file(s): " + "; ".join(_few(unreadable))
                        + ". Remove or replace them")
    if small:
        problems.append(
            f"{len(small)} image(s) too small for this {scale}x model: " + ", ".join(_few(small))
            + f". Each side needs at least {smallest} px: the images are cropped to multiples of "
            f"{scale}, the low-resolution input must keep at least 1 px and the output at least "
            f"{SSIM_WINDOW} px per side for SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window. Use larger "
            "ground-truth images")
    if problems:
        raise ValueError("; ".join(problems))
    return sizes


def _few(items: list[str], count: int = 5) -> list[str]:
    return items if len(items) <= count else [*items[:count], f"and {len(items) - count} more"]


# --- the evaluation ---------------------------------------------------------------------------

@dataclass
class ImageRecord:
    """One ground-truth image's results. height, width: after the crop to multiples of the scale.
    sr3, bicubic: {psnr, ssim, consistency, sharpness_ratio, seconds}. pictures: with
    keep_images=True, the (1, 3, ...) tensors low, bicubic, sr3, ground_truth (8-bit values)."""
    name: str
    height: int
    width: int
    sr3: dict
    bicubic: dict
    pictures: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "height": self.height, "width": self.width,
                "sr3": dict(self.sr3), "bicubic": dict(self.bicubic)}


@dataclass
class EvalReport:
    """The results of `evaluate_images`: model (a name, or None), settings {steps, sampler, seed,
    scale, device} (the steps and sampler upscale used; `requested_steps`/`requested_sampler`
    say what was asked, None meaning the model's recommended) and the per-image records."""
    model: str | None
    settings: dict
    images: list[ImageRecord]

    @property
    def mean(self) -> dict:
        """{sr3: {...}, bicubic: {...}}: each metric averaged over the images."""
        return {method: {metric: sum(getattr(r, method)[metric] for r in self.images) / len(self.images)
                         for metric in METRICS} for method in METHODS}

    def to_dict(self) -> dict:
        return {"model": self.model, "settings": dict(self.settings),
                "images": [record.to_dict() for record in self.images], "mean": self.mean}

    def table(self) -> str:
        """The results as a text table: one line per image and the mean."""
        name_width = max(5, *(len(r.name) for r in self.images))
        columns = ("PSNR", "SSIM", "consist.", "sharp.", "s/image")
        block = " ".join(f"{c:>8s}" for c in columns)
        span = len(block)
        lines = [f"{'':{name_width}s} {'':9s}  {' SR3 ':-^{span}s}  {' bicubic ':-^{span}s}",
                 f"{'image':{name_width}s} {'size':>9s}  {block}  {block}"]

        def cells(values: dict) -> str:
            return (f"{values['psnr']:8.2f} {values['ssim']:8.4f} {values['consistency']:8.1e} "
                    f"{values['sharpness_ratio']:8.3f} {values['seconds']:8.2g}")

        for r in self.images:
            size = f"{r.width}x{r.height}"
            lines.append(f"{r.name:{name_width}s} {size:>9s}  {cells(r.sr3)}  {cells(r.bicubic)}")
        mean = self.mean
        label = f"mean ({len(self.images)})"
        lines.append(f"{label:{name_width}s} {'':9s}  {cells(mean['sr3'])}  {cells(mean['bicubic'])}")
        settings = self.settings
        lines.append(f"model {self.model}, {settings['scale']}x, sampler {settings['sampler']}, "
                     f"{settings['steps']} steps, start_gamma {settings.get('start_gamma')}, back-projections {settings.get('back_projections')}, seed {settings['seed']}, device {settings['device']}. "
                     "consist.: MSE of the output downsampled vs the input; sharp.: high-frequency "
                     "energy / the ground truth's")
        return "\n".join(lines)


def _effective_settings(model, steps, sampler, start_gamma=None) -> tuple:
    """The (steps, sampler, start_gamma) upscale will use for these arguments (the model's
    recommended ones fill in what is None)."""
    from .api import _settings

    used_sampler, used_steps, _, start_gamma = _settings(model, sampler, steps, None, None, start_gamma)
    return used_steps, used_sampler, start_gamma


def _device_of(model) -> str:
    parameter = next(model.parameters(), None)
    return str(parameter.device) if parameter is not None else "cpu"


def super_resolve(model, low: torch.Tensor, seed: int | None, **options) -> torch.Tensor:
    """`low` (B, 3, h, w) in [0, 1] super-resolved by `model` with sr3fast.upscale (seed and
    `options` passed on, no progress bar), on the CPU in float32, rounded to 8 bits as a saved
    image would be: what `evaluate_images` and `sr3fast study make` compare with the truth."""
    from .api import upscale

    return quantize(upscale(low, model=model, seed=seed, progress=False, **options).float().cpu())


@torch.no_grad()
def evaluate_images(model, paths: Sequence[str | os.PathLike], steps: int | None = None,
                    sampler: str | None = None, seed: int = 0, progress: bool = True,
                    keep_images: bool = False, model_name: str | None = None,
                    start_gamma: float | None = None, back_projections: int | None = None, warmup: bool = True) -> EvalReport:
    """Evaluate `model` (an SR3 from sr3fast.load) against the ground-truth image files `paths`
    (see `find_images` to expand folders), as described in this module's docstring.

    steps, sampler, start_gamma, back_projections: passed to sr3fast.upscale only when given (None: the model's recommended
    settings, else upscale's defaults). seed: the seed for every image. progress: one line per
    image on stderr. keep_images: keep each image's low, bicubic, sr3 and ground_truth tensors in
    its record's `pictures` (needed by `save_grid`). warmup: run one untimed 1-step sample of the
    first input before timing, so one-off costs (kernel selection, lazy initialisation) do not
    land on the first image's s/image.

    Every file is decoded and size-checked before sampling starts (`check_images`): unreadable or
    too-small images raise ValueError naming them.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no ground-truth images to evaluate")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if sampler is not None:
        from .diffusion import SAMPLERS
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    from .api import upscale

    scale = model_scale(model)
    check_images(paths, scale)
    options = {key: value for key, value in (("steps", steps), ("sampler", sampler),
                                             ("start_gamma", start_gamma),
                                             ("back_projections", back_projections)) if value is not None}
    used_steps, used_sampler, used_start = _effective_settings(model, steps, sampler, start_gamma)
    from .api import _back_projections

    settings = {"steps": used_steps, "sampler": used_sampler, "start_gamma": used_start,
                "back_projections": _back_projections(model, back_projections),
                "seed": seed, "scale": scale,
                "device": _device_of(model), "requested_steps": steps, "requested_sampler": sampler}

    records = []
    for index, path in enumerate(paths):
        if progress:
            print(f"[{index + 1}/{len(paths)}] {path}", file=sys.stderr, flush=True)
        ground_truth = crop_to_multiple(load_ground_truth(path), scale)
        low = degrade(ground_truth, scale)
        if warmup and index == 0:
            try:
                upscale(low, model=model, seed=seed, progress=False, **{**options, "steps": 1})
            except Exception:   # only a warm-up: the timed call below reports real problems
                pass

        started = time.perf_counter()
        output = super_resolve(model, low, seed, **options)
        sr3_seconds = time.perf_counter() - started
        if output.shape != ground_truth.shape:
            raise RuntimeError(f"the model turned a {low.shape[-1]}x{low.shape[-2]} input into a "
                               f"{output.shape[-1]}x{output.shape[-2]} output, not "
                               f"{ground_truth.shape[-1]}x{ground_truth.shape[-2]} ({scale}x)")
        started = time.perf_counter()
        bicubic = bicubic_upscale(low, scale)
        bicubic_seconds = time.perf_counter() - started

        (sr3_metrics,) = image_metrics(output, ground_truth, low)
        (bicubic_metrics,) = image_metrics(bicubic, ground_truth, low)
        sr3_metrics["seconds"], bicubic_metrics["seconds"] = sr3_seconds, bicubic_seconds
        pictures = {"low": low, "bicubic": bicubic, "sr3": output, "ground_truth": ground_truth} \
            if keep_images else None
        records.append(ImageRecord(str(path), ground_truth.shape[-2], ground_truth.shape[-1],
                                   sr3_metrics, bicubic_metrics, pictures))

    return EvalReport(model_name, settings, records)


# --- writing the results ----------------------------------------------------------------------

def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def report_json(report: EvalReport) -> str:
    """`report.to_dict()` as JSON text; non-finite numbers (the PSNR of an exact reproduction)
    become null."""
    return json.dumps(_finite_or_none(report.to_dict()), indent=2, allow_nan=False) + "\n"


def write_json(report: EvalReport, path: str | os.PathLike) -> Path:
    """Write `report_json(report)` to `path` atomically (a temporary file in the same folder,
    renamed over `path`): a failure leaves no partial file and an existing `path` untouched."""
    path = Path(path)
    text = report_json(report)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _fit_width(picture: torch.Tensor, width: int) -> torch.Tensor:
    """(1, 3, h, w) scaled to `width` keeping the aspect ratio: nearest neighbour when enlarging
    (no invented detail), antialiased bicubic when shrinking."""
    if picture.shape[-1] == width:
        return picture
    height = max(1, round(picture.shape[-2] * width / picture.shape[-1]))
    if width > picture.shape[-1]:
        return F.interpolate(picture, size=(height, width), mode="nearest")
    return resize(picture, (height, width))


def grid_image(report: EvalReport, max_width: int = GRID_MAX_WIDTH) -> Image.Image:
    """The comparison grid: one row per image, left to right the input (enlarged by nearest
    neighbour), bicubic, SR3 and the ground truth, each followed by GRID_GAP white pixels on the
    right and below (the style of the training validation grid). Every picture is scaled to one
    common width, the first image's width capped at `max_width` (nearest neighbour when
    enlarging, antialiased bicubic when shrinking; heights keep each image's aspect ratio), so the
    grid is 4 x (width + GRID_GAP) wide. Needs a report made with keep_images=True."""
    if not report.images or any(r.pictures is None for r in report.images):
        raise ValueError("the grid needs the pictures: evaluate with keep_images=True")
    width = min(report.images[0].width, max_width)
    rows = []
    for record in report.images:
        p = record.pictures
        size = p["ground_truth"].shape[-2:]
        row = [F.interpolate(p["low"], size=size, mode="nearest"), p["bicubic"], p["sr3"], p["ground_truth"]]
        row = [F.pad(_fit_width(picture.float().cpu(), width), (0, GRID_GAP, 0, GRID_GAP), value=1.0)
               for picture in row]
        rows.append(torch.cat(row, dim=-1))
    grid = (torch.cat(rows, dim=-2)[0] * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())


def save_grid(report: EvalReport, path: str | os.PathLike, max_width: int = GRID_MAX_WIDTH) -> Path:
    """Write `grid_image(report)` to `path` (an image suffix) atomically."""
    return save_image_atomic(grid_image(report, max_width), path)


def write_outputs(report: EvalReport, json_path: str | os.PathLike | None = None,
                  grid_path: str | os.PathLike | None = None) -> list[Path]:
    """Write the JSON results and/or the grid, all or nothing: both go to temporary files in
    their folders first and are renamed into place only once both are complete, so a failure
    leaves neither file changed and no temporary file behind. Returns the paths written."""
    outputs = []
    if grid_path is not None:
        grid_path = check_output_path(grid_path, image=True)
        picture = grid_image(report)
        fmt = Image.registered_extensions()[grid_path.suffix.lower()]
        outputs.append((grid_path, lambda tmp: picture.save(tmp, format=fmt)))
    if json_path is not None:
        text = report_json(report)
        outputs.append((Path(json_path), lambda tmp: tmp.write_text(text, encoding="utf-8")))
    with ExitStack() as stack:
        temporaries = [stack.enter_context(atomic_path(path)) for path, _ in outputs]
        for (_, write), tmp in zip(outputs, temporaries):
            write(tmp)
    return [path for path, _ in outputs]


def check_output_path(path: str | os.PathLike, image: bool = False) -> Path:
    """Raise ValueError / FileNotFoundError now, before any work, for an output `path` that could
    not be written later: a missing folder, a folder in its place, or (image=True) a suffix that
    is not an image format."""
    path = Path(path)
    if image and path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"output {str(path)!r} needs an image suffix ({', '.join(IMAGE_SUFFIXES)})")
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a folder; name a file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist")
    return path
