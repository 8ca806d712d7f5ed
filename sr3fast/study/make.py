"""`sr3fast study make`: a study folder from ground-truth photos and one or more models.

For each photo (or one crop of it, `crop=`), the way `sr3fast eval` makes its comparisons
(`sr3fast.evaluation`): the ground truth cropped to a multiple of the scale, its low-resolution
input (antialiased bicubic downsampling, 8 bits), and each model's output from that input, all
from the same seed. Plus, for the attention checks, the input blurred further: halved again and
upsampled bicubically to the output size, a picture nobody attentive mistakes for a photo.

Trials: every model on every photo in both task variants (`manifest.VARIANTS`), and
`attention_checks` attention trials per variant (the blurred picture in the model's place) on
photos drawn with the seed.

The folder is built under a temporary name next to `out` and renamed to `out` only when complete,
the manifest written last: a failure or Ctrl-C leaves no study folder, and no half of one.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..atomic import _umask, atomic_path
from .manifest import FORMAT, MANIFEST, VARIANTS, VERSION, sha256_bytes, study_id

IMAGES = "images"
DEFAULT_ATTENTION_CHECKS = 2       # per variant, each on a different photo


@dataclass(frozen=True)
class StudyModel:
    """A model taking part: `name` as the user gave it (the report's label) and the SR3 itself."""
    name: str
    model: object


def check_target(out: str | os.PathLike) -> Path:
    """The study folder to create, checked before any work: its parent must exist, and it must
    not exist yet (or be an empty folder), so no earlier study or answers are overwritten."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} already exists and is not an empty folder; choose a new "
                         "name (a study's answers live inside its folder)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot create --out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    return out


def choose_photos(paths: Sequence[Path], n: int | None, seed: int) -> list[Path]:
    """`n` of the photos drawn with `seed` (all of them when n is None), in sorted order."""
    paths = list(paths)
    if n is None:
        return paths
    if n < 1 or n > len(paths):
        raise ValueError(f"--n must be between 1 and the {len(paths)} photos found, got {n}")
    chosen = set(random.Random(seed).sample(range(len(paths)), n))
    return [path for i, path in enumerate(paths) if i in chosen]


def study_scale(models: Sequence[StudyModel], scale: int | None) -> int:
    """The overall upscaling factor, the same for every model (they share the inputs): `scale`
    (a power of each model's own factor, run as a cascade), else the models' own factor."""
    from ..cascades import repeated
    from ..evaluation import model_scale

    factors = {entry.name: model_scale(entry.model) for entry in models}
    if scale is None:
        if len(set(factors.values())) > 1:
            listed = ", ".join(f"{name} {factor}x" for name, factor in factors.items())
            raise ValueError(f"the models upscale by different factors ({listed}); pass --scale with a "
                             "factor all of them reach")
        return next(iter(factors.values()))
    for entry in models:
        repeated(entry.model, scale)          # raises ValueError when scale is not a power of its factor
    return scale


def model_settings(entry: StudyModel, steps: int | None, sampler: str | None, scale: int, seed: int,
                   device: str) -> dict:
    """The settings the model's outputs are made with, as `sr3fast eval` reports them (the model's
    recommended ones fill in what was not asked for). Raises ValueError for unusable ones."""
    from ..api import _back_projections, _settings
    from ..evaluation import _device_of, _effective_settings

    _settings(entry.model, sampler, steps, None)          # the checks upscale makes, made now
    used_steps, used_sampler, start_gamma = _effective_settings(entry.model, steps, sampler)
    return {"name": entry.name, "steps": used_steps, "sampler": used_sampler, "start_gamma": start_gamma,
            "back_projections": _back_projections(entry.model, None), "scale": scale, "seed": seed,
            "device": _device_of(entry.model) if device is None else device}


def ground_truths(paths: Sequence[Path], crop: int | None, scale: int) -> list[tuple[str, object]]:
    """(name, (1, 3, H, W) ground truth) per photo: one crop x crop from its centre (`sr3fast
    tune-schedule`'s crops; a photo smaller than the crop is used whole), or the whole photo,
    cropped from the top-left to multiples of the scale as `sr3fast eval` does."""
    from ..evaluation import crop_to_multiple, load_ground_truth, minimum_side
    from ..schedule_search import crops_of

    if crop is None:
        return [(str(path), crop_to_multiple(load_ground_truth(path), scale)) for path in paths]
    smallest = minimum_side(scale)
    if crop < smallest or crop % scale:
        raise ValueError(f"--crop must be a multiple of the scale {scale} and at least {smallest} px, got {crop}")
    return [(f"{path}@{name.rsplit('@', 1)[1]}" if "@" in name else str(path), crop_to_multiple(truth, scale))
            for path, (name, truth) in zip(paths, crops_of(paths, crop, 1, scale))]


def attention_picture(low, size: tuple[int, int]):
    """The attention check's candidate: the low-resolution input halved again and upsampled
    bicubically (antialiased, 8 bits) to `size`: far blurrier than any model's output."""
    from ..train.data import quantize, resize

    half = (max(1, low.shape[-2] // 2), max(1, low.shape[-1] // 2))
    return quantize(resize(resize(low, half), size))


class _ImageWriter:
    """Writes pictures into a study's images/ folder under names made from their content, and
    remembers every file's SHA-256 (the manifest's `files`)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, str] = {}
        (folder / IMAGES).mkdir()

    def write(self, picture) -> str:
        from ..images import InputKind, from_unit_batch

        buffer = io.BytesIO()
        from_unit_batch(picture, InputKind("pil")).save(buffer, format="PNG")
        data = buffer.getvalue()
        digest = sha256_bytes(data)
        name = f"{IMAGES}/{digest[:20]}.png"
        if name not in self.files:
            with atomic_path(self.folder / name) as tmp:
                tmp.write_bytes(data)
            self.files[name] = digest
        return name


def check_attention_checks(count: int, photos: int) -> None:
    # each attention trial of a variant uses a different photo
    if count < 0 or count > photos:
        raise ValueError(f"--attention-checks must be between 0 and the {photos} photos, got {count}")


def make_trials(items: list[dict], models: Sequence[StudyModel], attention_checks: int, seed: int) -> list[dict]:
    """Every model on every item in each variant, then `attention_checks` attention trials per
    variant on items drawn with `seed`. Trial ids are numbered in a shuffled order so that an id
    tells nothing about the trial."""
    check_attention_checks(attention_checks, len(items))
    rng = random.Random(seed)
    trials = [{"kind": "model", "model": entry.name, "item": item["id"], "variant": variant}
              for variant in VARIANTS for entry in models for item in items]
    for variant in VARIANTS:
        trials += [{"kind": "attention", "model": None, "item": item["id"], "variant": variant}
                   for item in sorted(rng.sample(items, attention_checks), key=lambda item: item["id"])]
    numbers = list(range(len(trials)))
    rng.shuffle(numbers)
    width = len(str(len(trials) - 1))
    return [{"id": f"t{number:0{width}d}", **trial} for number, trial in zip(numbers, trials)]


def make_study(models: Sequence[StudyModel], photos: Sequence[str | os.PathLike], out: str | os.PathLike, *,
               steps: int | None = None, sampler: str | None = None, seed: int = 0, n: int | None = None,
               crop: int | None = None, scale: int | None = None, attention_checks: int | None = None,
               device: str | None = None, progress: bool = True) -> Path:
    """Build the study folder `out` (see this module's docstring) and return its path.

    models: the models compared, with distinct names. photos: ground-truth image files or folders
    (searched recursively, `sr3fast.evaluation.find_images`). steps, sampler: for every model
    (None: each model's recommended). seed: the sampling seed of every image (as `sr3fast eval`),
    and the draw of the photos (`n` of them, all when None) and of the attention trials. crop:
    one crop x crop crop from each photo's centre. scale: overall factor (default: the models').
    attention_checks: attention trials per variant (default: 2, or 1 with a single photo).

    Every check that can fail is made before the first image is sampled; whatever fails later
    leaves nothing behind."""
    from ..evaluation import check_images, degrade, find_images, model_scale, super_resolve

    if not models:
        raise ValueError("no models given; pass --model (e.g. --model default)")
    names = [entry.name for entry in models]
    if len(set(names)) != len(names):
        raise ValueError(f"a model is named twice ({', '.join(names)}); give each --model once")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    out = check_target(out)
    scale = study_scale(models, scale)
    paths = choose_photos(find_images(photos), n, seed)
    check_images(paths, scale)
    if attention_checks is None:
        attention_checks = min(DEFAULT_ATTENTION_CHECKS, len(paths))
    check_attention_checks(attention_checks, len(paths))
    settings = [model_settings(entry, steps, sampler, scale, seed, device) for entry in models]
    truths = ground_truths(paths, crop, scale)
    options = {key: value for key, value in (("steps", steps), ("sampler", sampler)) if value is not None}
    # a model whose own factor is short of the scale runs as a cascade (upscale's scale=)
    stages = {entry.name: {"scale": scale} if model_scale(entry.model) != scale else {} for entry in models}

    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(partial, 0o777 & ~_umask())      # mkdtemp's folder is private; a study is not
        writer = _ImageWriter(partial)
        items = []
        for index, (source, truth) in enumerate(truths):
            if progress:
                print(f"[{index + 1}/{len(truths)}] {source}", file=sys.stderr, flush=True)
            low = degrade(truth, scale)
            size = tuple(truth.shape[-2:])
            outputs = {}
            for entry in models:
                output = super_resolve(entry.model, low, seed, **options, **stages[entry.name])
                if tuple(output.shape[-2:]) != size:
                    raise RuntimeError(f"model {entry.name!r} turned a {low.shape[-1]}x{low.shape[-2]} input "
                                       f"into {output.shape[-1]}x{output.shape[-2]}, not {size[1]}x{size[0]}")
                outputs[entry.name] = writer.write(output)
            items.append({"id": f"i{index:0{len(str(len(truths) - 1))}d}", "source": source,
                          "size": list(size), "input": writer.write(low), "ground_truth": writer.write(truth),
                          "outputs": outputs, "attention": writer.write(attention_picture(low, size))})
        trials = make_trials(items, models, attention_checks, seed)
        manifest = {
            "format": FORMAT, "version": VERSION, "study_id": study_id(writer.files, trials),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sr3fast_version": _version(),
            "settings": {"photos": [str(p) for p in photos], "n": len(paths), "crop": crop, "scale": scale,
                         "seed": seed, "steps": steps, "sampler": sampler,
                         "attention_checks": attention_checks},
            "variants": dict(VARIANTS), "models": settings, "items": items, "trials": trials,
            "files": writer.files,
        }
        with atomic_path(partial / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.is_dir():
            out.rmdir()                # empty (check_target): the rename needs it gone
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _version() -> str:
    from .. import __version__
    return __version__
