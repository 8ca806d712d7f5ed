"""Converting what users pass to `upscale` (tensors, PIL images, paths) to model input and back."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class InputKind:
    """How the caller's input looked, so the result can be returned the same way."""
    kind: str                 # "float", "uint8", "pil"
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB. Clear errors for a missing or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input image {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"input {str(path)!r} is a folder; pass the image files in it "
                                "(the command line accepts folders)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(path)!r} as an image ({err}); supported: "
                         f"{', '.join(IMAGE_SUFFIXES)}") from None


def to_unit_batch(image) -> tuple[torch.Tensor, InputKind]:
    """(B, 3, h, w) float32 in [0, 1] from a float tensor in [0, 1], a uint8 tensor, a PIL image
    or a path; plus how to give the result back (`from_unit_batch`)."""
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)          # (h, w, 3)
        batch = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255
        return batch, InputKind("pil")
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"upscale takes a tensor (B, 3, h, w), a PIL image or a path, "
                        f"not {type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != 3:
        hint = " (add a batch dimension with x[None])" if image.dim() == 3 and image.shape[0] == 3 else ""
        raise ValueError(f"expected an image batch of shape (B, 3, h, w), got {tuple(image.shape)}{hint}")
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"the image batch is empty: shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255, InputKind("uint8", image.dtype, image.device)
    if not image.is_floating_point():
        raise TypeError(f"image tensors must be float in [0, 1] or uint8, not {image.dtype}")
    values = image.float()
    if not torch.isfinite(values).all():
        raise ValueError("the input contains NaN or Inf values")
    low, high = values.min().item(), values.max().item()
    if low < 0 or high > 1:
        hint = ("it looks like [-1, 1]: pass (x + 1) / 2" if low >= -1 and high <= 1 else
                "it looks like [0, 255]: pass x / 255" if low >= 0 and high <= 255 else
                "rescale it to [0, 1]")
        raise ValueError(f"float input must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; {hint}")
    return values, InputKind("float", image.dtype, image.device)


def from_unit_batch(batch: torch.Tensor, kind: InputKind):
    """Give back (B, 3, H, W) values in [0, 1] the way the input came: same tensor dtype and
    device, or a PIL image (for PIL and path inputs, which must have been a single image)."""
    batch = batch.clamp(0, 1)
    if kind.kind == "float":
        return batch.to(device=kind.device, dtype=kind.dtype)
    as_bytes = (batch * 255).round().to(torch.uint8)
    if kind.kind == "uint8":
        return as_bytes.to(kind.device)
    return Image.fromarray(as_bytes[0].permute(1, 2, 0).cpu().numpy())


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write `image` to `path` (format from the suffix) without ever leaving a half-written file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"output {str(path)!r} needs an image suffix ({', '.join(IMAGE_SUFFIXES)})")
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions()[suffix])
    return path
