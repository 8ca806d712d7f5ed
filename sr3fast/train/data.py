"""Training pairs (condition x, target y0) from a folder of high-resolution images.

A folder of photos (PNG, JPEG, ... of any size, in subfolders too): each sample is a random
high_res crop; its low-resolution input is made as the paper does, by bicubic downsampling with
antialiasing, optionally Gaussian-blurred (the paper's augmentation), rounded to 8 bits as a
saved image would be; the condition x is that input upsampled with the very function
`sr3fast.upscale` uses. Random horizontal flips are on by default.

A folder in the public SR3 code's prepared layout (hr_{R}/, lr_{r}/, sr_{r}_{R}/, same file names
in each) is read as is: targets from hr_{R}, inputs from lr_{r} (or downsampled from the target
when lr_{r} is absent). sr_{r}_{R} is not needed: the condition is recomputed from the input,
so training sees exactly the condition inference will.

Values are in [-1, 1]. Unreadable and too-small images are skipped and counted. Samples are
addressed by (image_index, sample_seed) keys (see sr3fast.train.order), which fix the crop,
flip and blur: the data is reproducible in any worker process.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..images import IMAGE_SUFFIXES

# What PIL raises for a file that is not a usable image (DecompressionBombError: over ~179 MP).
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Decode every image once up front when they fit in this much memory (uint8 RGB, per process).
PRELOAD_LIMIT_BYTES = 1024 ** 3


class DataError(ValueError):
    """The training data cannot be used; the message says what is wrong and what to do."""


class DecodeError(DataError):
    """An image file whose header reads but whose pixels do not."""


# --- the degradation model ------------------------------------------------------------------

def resize(images: torch.Tensor, size) -> torch.Tensor:
    """Bicubic resize with antialiasing (PIL's kernel) of (B, C, H, W) images in [0, 1], clamped."""
    return F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=False,
                         antialias=True).clamp(0, 1)


def to_condition(low: torch.Tensor, size: int) -> torch.Tensor:
    """The model's condition x in [-1, 1] from low-resolution images in [0, 1]: the same
    expression sr3fast.upscale evaluates, so training and inference see identical conditions."""
    return F.interpolate(low * 2 - 1, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True).clamp(-1, 1)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] values to 8 bits, as saving the image would."""
    return (images * 255).round() / 255


def gaussian_blur(images: torch.Tensor, sigma: float, size: int = 3) -> torch.Tensor:
    """(B, C, H, W) images blurred by a normalised size x size Gaussian (reflected borders)."""
    taps = torch.arange(size, dtype=images.dtype, device=images.device) - (size - 1) / 2
    line = torch.exp(-taps.square() / (2 * sigma ** 2))
    line = line / line.sum()
    channels = images.shape[1]
    kernel = (line[:, None] * line[None, :]).expand(channels, 1, size, size)
    padded = F.pad(images, [size // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)


@dataclass(frozen=True)
class Augment:
    """Random augmentation of training pairs.

    flip: mirror left-right with probability 1/2. blur: probability of blurring the
    low-resolution input with a blur_size x blur_size Gaussian of sigma ~ U(blur_sigma). The
    SR3 paper reports the blur improves FID but gives no parameters; the defaults are those of
    Ho et al.'s cascaded diffusion models (3x3 kernel, sigma in [0.4, 0.6])."""
    flip: bool = True
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.4, 0.6)
    blur_size: int = 3

    def __post_init__(self):
        if not 0.0 <= self.blur <= 1.0:
            raise ValueError(f"blur probability must be in [0, 1], got {self.blur}")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            raise ValueError(f"blur sigma range must satisfy 0 < low <= high, got {self.blur_sigma}")


def make_pair(high: torch.Tensor, low: torch.Tensor | None, low_res: int, augment: Augment,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(condition x, target y0), both (3, R, R) in [-1, 1], from a (3, R, R) target crop in
    [0, 1] and, if given, its (3, r, r) low-resolution input (else bicubic-downsampled).
    Draws flip, blur choice and sigma from `generator`, always all three, in that order."""
    flip, blur, sigma_unit = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    if augment.flip and flip < 0.5:
        high = high.flip(-1)
        low = None if low is None else low.flip(-1)
    if low is None:
        low = quantize(resize(high[None], (low_res, low_res)))[0]
    if blur < augment.blur:
        sigma = augment.blur_sigma[0] + sigma_unit * (augment.blur_sigma[1] - augment.blur_sigma[0])
        low = quantize(gaussian_blur(low[None], sigma, augment.blur_size)[0].clamp(0, 1))
    return to_condition(low[None], high.shape[-1])[0], high * 2 - 1


# --- reading image files ----------------------------------------------------------------------

def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _as_unit(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255  # a writable copy


@dataclass
class ImageFiles:
    """Readable images (paths and sizes) found by `scan`, decoded on demand or preloaded."""
    paths: list[Path]
    sizes: list[tuple[int, int]]                        # (width, height), after EXIF rotation
    skipped: Counter = field(default_factory=Counter)   # reason -> count
    _pixels: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def preload(self, limit_bytes: int = PRELOAD_LIMIT_BYTES) -> None:
        """Decode every image now if they fit in limit_bytes; the undecodable are dropped."""
        if sum(w * h * 3 for w, h in self.sizes) > limit_bytes:
            return
        kept = ([], [], [])
        for path, size in zip(self.paths, self.sizes):
            try:
                pixels = _decode(path)
            except _READ_ERRORS:
                self.skipped["unreadable"] += 1
                continue
            for items, item in zip(kept, (path, size, pixels)):
                items.append(item)
        self.paths, self.sizes, self._pixels = kept

    def read(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 pixels of image `index`; DecodeError when the file cannot be decoded
        (a truncated file whose header looked fine)."""
        if self._pixels is not None:
            return self._pixels[index]
        try:
            return _decode(self.paths[index])
        except _READ_ERRORS as err:
            raise DecodeError(f"{str(self.paths[index])!r} cannot be decoded ({err})") from None

    def subset(self, indices: list[int]) -> "ImageFiles":
        pick = lambda items: None if items is None else [items[i] for i in indices]  # noqa: E731
        return ImageFiles(pick(self.paths), pick(self.sizes), Counter(), pick(self._pixels))


def list_images(folder: Path) -> list[Path]:
    """Image files (by suffix) in `folder` and its subfolders, sorted; hidden entries skipped."""
    return sorted(path for path in folder.rglob("*")
                  if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def scan(paths: list[Path], min_size: tuple[int, int] | None = None,
         exact_size: tuple[int, int] | None = None) -> ImageFiles:
    """The images among `paths` that open and are at least min_size (or exactly exact_size),
    as (width, height); reads headers only."""
    kept, sizes, skipped = [], [], Counter()
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
                if _rotated(image):
                    width, height = height, width
        except _READ_ERRORS:
            skipped["unreadable"] += 1
            continue
        if min_size and (width < min_size[0] or height < min_size[1]):
            skipped[f"smaller than {min_size[0]}x{min_size[1]}"] += 1
        elif exact_size and (width, height) != exact_size:
            skipped[f"not {exact_size[0]}x{exact_size[1]}"] += 1
        else:
            kept.append(path)
            sizes.append((width, height))
    return ImageFiles(kept, sizes, skipped)


def _rotated(image: Image.Image) -> bool:
    # EXIF orientations 5-8 swap width and height
    return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


# --- datasets ---------------------------------------------------------------------------------

def _read_first_decodable(count: int, index: int, load):
    """load(index), or load of the next index that decodes: one bad file among thousands
    (found only when decoded lazily) is replaced, with a warning, instead of ending a long run."""
    for offset in range(count):
        try:
            return load((index + offset) % count)
        except DecodeError as err:
            warnings.warn(f"skipping a training image: {err}")
    raise DataError("none of the training images can be decoded")


class CropPairs(torch.utils.data.Dataset):
    """Training pairs from random high_res x high_res crops of arbitrary-size images."""

    def __init__(self, images: ImageFiles, low_res: int, high_res: int, augment: Augment):
        self.images, self.low_res, self.high_res, self.augment = images, low_res, high_res, augment

    def __len__(self) -> int:
        return len(self.images)

    def _crop(self, index: int, generator: torch.Generator | None) -> torch.Tensor:
        """A random (centred when generator is None) high_res crop of image `index`, [0, 1]."""
        pixels = _read_first_decodable(len(self.images), index, self.images.read)
        spare_h, spare_w = pixels.shape[0] - self.high_res, pixels.shape[1] - self.high_res
        if generator is None:
            top, left = spare_h // 2, spare_w // 2
        else:
            top = int(torch.randint(spare_h + 1, (), generator=generator))
            left = int(torch.randint(spare_w + 1, (), generator=generator))
        return _as_unit(pixels[top:top + self.high_res, left:left + self.high_res])

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        generator = torch.Generator().manual_seed(seed)
        return make_pair(self._crop(index, generator), None, self.low_res, self.augment, generator)

    def validation_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(low (3, r, r), high (3, R, R)) in [0, 1]: the centre crop, no augmentation."""
        high = self._crop(index, None)
        return quantize(resize(high[None], (self.low_res, self.low_res)))[0], high

    def subset(self, indices: list[int]) -> "CropPairs":
        return CropPairs(self.images.subset(indices), self.low_res, self.high_res, self.augment)


class PreparedPairs(torch.utils.data.Dataset):
    """Training pairs from the public SR3 code's prepared folders: hr_{R}/ targets and, when
    present, lr_{r}/ inputs (aligned: input i belongs to target i)."""

    def __init__(self, targets: ImageFiles, inputs: ImageFiles | None, low_res: int,
                 augment: Augment):
        self.targets, self.inputs, self.low_res, self.augment = targets, inputs, low_res, augment
        self.images = targets

    def __len__(self) -> int:
        return len(self.targets)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        high = _as_unit(self.targets.read(index))
        low = None if self.inputs is None else _as_unit(self.inputs.read(index))
        return high, low

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        high, low = _read_first_decodable(len(self), index, self._load)
        return make_pair(high, low, self.low_res, self.augment, torch.Generator().manual_seed(seed))

    def validation_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        high, low = _read_first_decodable(len(self), index, self._load)
        if low is None:
            low = quantize(resize(high[None], (self.low_res, self.low_res)))[0]
        return low, high

    def subset(self, indices: list[int]) -> "PreparedPairs":
        inputs = None if self.inputs is None else self.inputs.subset(indices)
        return PreparedPairs(self.targets.subset(indices), inputs, self.low_res, self.augment)


# --- opening a data folder --------------------------------------------------------------------

def _describe_skips(skipped: Counter) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))


def _prepared_layout(folder: Path, low_res: int, high_res: int) -> tuple[Path, Path | None] | None:
    """(hr folder, lr folder or None) when `folder` is in the public SR3 prepared layout."""
    hr_folders = sorted(p.name for p in folder.glob("hr_*") if p.is_dir())
    if not hr_folders:
        return None
    target = folder / f"hr_{high_res}"
    if not target.is_dir():
        raise DataError(f"{str(folder)!r} is in the public SR3 prepared layout but has no hr_{high_res}/ "
                        f"for this {low_res}->{high_res} model (found {', '.join(hr_folders)}/). "
                        "Prepare it for these sizes, pick the preset that matches them, or point "
                        "--data at a folder of raw high-resolution images.")
    inputs = folder / f"lr_{low_res}"
    return target, (inputs if inputs.is_dir() else None)


def _require_images(folder: Path) -> list[Path]:
    if not folder.exists():
        raise FileNotFoundError(f"data folder {str(folder)!r} does not exist; pass --data a folder "
                                "of high-resolution training images")
    if not folder.is_dir():
        raise DataError(f"--data {str(folder)!r} is a file; pass the folder that holds the images")
    paths = list_images(folder)
    if paths:
        return paths
    others = [p for p in folder.rglob("*") if p.is_file()]
    if not others:
        raise DataError(f"data folder {str(folder)!r} is empty; put high-resolution training "
                        f"images ({', '.join(IMAGE_SUFFIXES)}) in it")
    examples = ", ".join(p.name for p in others[:3])
    raise DataError(f"data folder {str(folder)!r} holds no images: its {len(others)} file(s) "
                    f"({examples}{', ...' if len(others) > 3 else ''}) have none of the suffixes "
                    f"{', '.join(IMAGE_SUFFIXES)}")


def _require_usable(images: ImageFiles, found: int, folder: Path, need: str) -> None:
    if len(images):
        return
    raise DataError(f"none of the {found} image(s) in {str(folder)!r} can be used "
                    f"({_describe_skips(images.skipped)}); the model needs {need}. Use larger images, "
                    "or a preset with a smaller output size (sr3fast presets)")


def _align(targets: ImageFiles, target_folder: Path, inputs: ImageFiles,
           input_folder: Path) -> tuple[ImageFiles, ImageFiles]:
    """Keep the pairs whose target and input both survived; count the inputs' skips too."""
    names = [p.relative_to(target_folder) for p in targets.paths]
    have = {p.relative_to(input_folder): i for i, p in enumerate(inputs.paths)}
    keep = [i for i, name in enumerate(names) if name in have]
    skipped = targets.skipped + Counter({f"input {k}": v for k, v in inputs.skipped.items()})
    targets, inputs = targets.subset(keep), inputs.subset([have[names[i]] for i in keep])
    targets.skipped = skipped
    return targets, inputs


def open_folder(folder: str | Path, low_res: int, high_res: int, augment: Augment,
                preload: bool = True) -> CropPairs | PreparedPairs:
    """The training pairs of `folder` (raw images or the prepared layout). Raises DataError
    (FileNotFoundError for a missing folder) with what to do when nothing is usable.
    preload: decode all images now when they fit in PRELOAD_LIMIT_BYTES."""
    folder = Path(folder)
    layout = _prepared_layout(folder, low_res, high_res) if folder.is_dir() else None
    if layout is None:
        paths = _require_images(folder)
        images = scan(paths, min_size=(high_res, high_res))
        if preload:
            images.preload()
        _require_usable(images, len(paths), folder, f"images of at least {high_res}x{high_res} pixels")
        return CropPairs(images, low_res, high_res, augment)

    target_folder, input_folder = layout
    names = [p.relative_to(target_folder) for p in _require_images(target_folder)]
    targets = scan([target_folder / n for n in names], exact_size=(high_res, high_res))
    inputs = None
    if input_folder is not None:
        missing = [str(n) for n in names if not (input_folder / n).is_file()]
        if missing:
            raise DataError(f"{len(missing)} image(s) of {str(target_folder)!r} have no counterpart in "
                            f"{str(input_folder)!r} (e.g. {missing[0]}); the prepared folders must "
                            "hold the same file names")
        inputs = scan([input_folder / n for n in names], exact_size=(low_res, low_res))
        targets, inputs = _align(targets, target_folder, inputs, input_folder)
    if preload:
        targets.preload()
        if inputs is not None:
            inputs.preload()
            targets, inputs = _align(targets, target_folder, inputs, input_folder)
    _require_usable(targets, len(names), target_folder, f"{high_res}x{high_res} targets")
    return PreparedPairs(targets, inputs, low_res, augment)


def hold_out(dataset: CropPairs | PreparedPairs, count: int):
    """(training part, held-out part): the last `count` images (in sorted file order) are held
    out for validation, so the split is the same in every run and process."""
    if count >= len(dataset):
        raise DataError(f"cannot hold out {count} of {len(dataset)} usable image(s) for validation "
                        "and still train; lower --holdout or pass a separate folder with --val")
    keep = len(dataset) - count
    train, held = dataset.subset(list(range(keep))), dataset.subset(list(range(keep, len(dataset))))
    train.images.skipped = dataset.images.skipped
    return train, held


def describe(dataset: CropPairs | PreparedPairs) -> str:
    """One line for the log: how many images, and how many were skipped and why."""
    images = dataset.images
    text = f"{len(images)} image(s)"
    return text + (f"; skipped {_describe_skips(images.skipped)}" if images.skipped else "")
