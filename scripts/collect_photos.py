"""Collect the default model's photographs from packages on the registry, into train/ and val/.

Every image here ships inside a pip package (scikit-image, scikit-learn, matplotlib) under a
licence that allows reuse; DATA.md lists them. The split is fixed: the val/ photos are held out
and never trained on. Greyscale photos are stored as RGB (three equal channels), so the model
sees their textures; the model itself always works on RGB.

    python scripts/collect_photos.py --out data/photos     # -> data/photos/{train,val}/*.png

Writes each PNG atomically and a manifest.json (name, split, source, licence, size, sha256 of
the pixels) last, so a folder with a manifest is complete. Needs no network.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Photo:
    name: str
    split: str        # "train" or "val" (held out)
    package: str      # where the file comes from
    loader: str       # module:function or module:relative/path inside the package
    licence: str
    credit: str


CATALOGUE = (
    # --- trained on ---
    Photo("astronaut", "train", "scikit-image", "skimage.data:astronaut", "public domain",
          "NASA, Eileen Collins (flic.kr/p/r9qvLn)"),
    Photo("chelsea", "train", "scikit-image", "skimage.data:chelsea", "CC0", "Stefan van der Walt"),
    Photo("rocket", "train", "scikit-image", "skimage.data:rocket", "public domain", "SpaceX"),
    Photo("hubble_deep_field", "train", "scikit-image", "skimage.data:hubble_deep_field",
          "public domain", "NASA / Hubble"),
    Photo("retina", "train", "scikit-image", "skimage.data:retina", "CC0",
          "Wikimedia Commons, Fundus photograph of normal left eye"),
    Photo("immunohistochemistry", "train", "scikit-image", "skimage.data:immunohistochemistry",
          "no known copyright restrictions", "scikit-image data"),
    Photo("china", "train", "scikit-learn", "sklearn.datasets:images/china.jpg", "CC BY 2.0",
          "danielbuechele (flickr.com/photos/danielbuechele/6061409035)"),
    Photo("camera", "train", "scikit-image", "skimage.data:camera", "CC0", "Lav Varshney"),
    Photo("brick", "train", "scikit-image", "skimage.data:brick", "CC0", "CC0Textures, Bricks25"),
    Photo("grass", "train", "scikit-image", "skimage.data:grass", "CC0", "linolafett (DeviantArt)"),
    Photo("gravel", "train", "scikit-image", "skimage.data:gravel", "CC0", "CC0Textures, Gravel04"),
    Photo("coins", "train", "scikit-image", "skimage.data:coins", "no known copyright restrictions",
          "Brooklyn Museum"),
    Photo("text", "train", "scikit-image", "skimage.data:text", "public domain",
          "Wikimedia Commons, Corner.png"),
    Photo("cell", "train", "scikit-image", "skimage.data:cell", "CC0", "Guck lab"),
    # --- held out: never trained on ---
    Photo("coffee", "val", "scikit-image", "skimage.data:coffee", "CC0", "Rachel Michetti"),
    Photo("flower", "val", "scikit-learn", "sklearn.datasets:images/flower.jpg", "CC BY 2.0",
          "vultilion (flickr.com/photos/vultilion/6056698931)"),
    Photo("grace_hopper", "val", "matplotlib", "matplotlib:mpl-data/sample_data/grace_hopper.jpg",
          "public domain", "U.S. Navy, Commodore Grace M. Hopper, 1984"),
)


def load_pixels(photo: Photo) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    import importlib

    module_name, _, target = photo.loader.partition(":")
    module = importlib.import_module(module_name)
    if "/" in target or "." in target:
        with Image.open(Path(module.__file__).parent / target) as image:
            pixels = np.asarray(image.convert("RGB"))
    else:
        pixels = np.asarray(getattr(module, target)())
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.dtype != np.uint8:
        raise ValueError(f"{photo.name}: expected 8-bit pixels, got {pixels.dtype}")
    return np.ascontiguousarray(pixels[..., :3])


def write_png(pixels: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)


def collect(out: Path) -> list[dict]:
    entries = []
    for photo in CATALOGUE:
        pixels = load_pixels(photo)
        folder = out / photo.split
        folder.mkdir(parents=True, exist_ok=True)
        write_png(pixels, folder / f"{photo.name}.png")
        entries.append({"name": photo.name, "split": photo.split, "package": photo.package,
                        "source": photo.loader, "licence": photo.licence, "credit": photo.credit,
                        "height": pixels.shape[0], "width": pixels.shape[1],
                        "sha256": hashlib.sha256(pixels.tobytes()).hexdigest()})
    manifest = out / "manifest.json"
    tmp = manifest.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(entries, indent=1) + "\n")
    os.replace(tmp, manifest)
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/photos", help="output folder (default data/photos)")
    args = parser.parse_args(argv)
    try:
        entries = collect(Path(args.out))
    except ImportError as err:
        print(f"collect_photos: error: {err}; install scikit-image, scikit-learn and matplotlib "
              "(scripts/setup.sh does)", file=sys.stderr)
        return 2
    for split in ("train", "val"):
        names = [e["name"] for e in entries if e["split"] == split]
        print(f"{split}: {len(names)} photos ({', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
