"""Ship a trained model as sr3fast's default: float16 safetensors inside the package.

    .venv/bin/python scripts/ship_default.py runs/default-4x/model.safetensors --sampler posterior \
        --steps 50 --start-gamma 0.5 --back-projections 2
    .venv/bin/python scripts/ship_default.py runs/default-4x/model.safetensors --settings-from tuned.safetensors

Reads the EMA weights `sr3fast train` wrote, stores them in float16 (half the bytes; the model
runs in float32, and the float16 rounding is checked against the original on one sample with
a stated bound) with the recommended sampling settings in the metadata, writes
sr3fast/weights/default-4x.safetensors atomically and its SHA-256 beside it.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sr3fast  # noqa: E402
from sr3fast.api import DEFAULT_WEIGHTS  # noqa: E402
from sr3fast.atomic import atomic_path  # noqa: E402
from sr3fast.inference_settings import InferenceSettings  # noqa: E402

SIZE_LIMIT = 25 * 1000 ** 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="model.safetensors of a training run (EMA weights)")
    parser.add_argument("--settings-from", metavar="MODEL",
                        help="take the recommended settings from this model's metadata (e.g. the output "
                             "of `sr3fast tune-schedule`, tuned schedule included) instead of the flags")
    parser.add_argument("--sampler")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--start-gamma", type=float, default=None)
    parser.add_argument("--back-projections", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.settings_from is None) == (args.sampler is None or args.steps is None):
        parser.error("give either --settings-from MODEL, or --sampler and --steps")

    model = sr3fast.load(args.checkpoint, dtype=torch.float32)   # a float16 file too: compared in float32
    if args.settings_from:
        model.inference_settings = sr3fast.load(args.settings_from).inference_settings
    else:
        model.inference_settings = InferenceSettings(sampler=args.sampler, steps=args.steps,
                                                     start_gamma=args.start_gamma,
                                                     back_projections=args.back_projections)
    DEFAULT_WEIGHTS.parent.mkdir(exist_ok=True)
    sr3fast.save(model, DEFAULT_WEIGHTS, dtype=torch.float16)

    # the shipped weights must give (nearly) the same predictions as the trained ones
    shipped = sr3fast.load("default")
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1 for _ in range(2))
    gamma = torch.tensor([0.5])
    with torch.no_grad():
        difference = (shipped.predict_noise(x, y, gamma) - model.predict_noise(x, y, gamma)).abs().max()
    print(f"float16 weights: max |eps difference| on one 64x64 sample {difference.item():.2e}")
    if difference > 1e-2:
        raise SystemExit("float16 rounding changes the predictions by more than 1e-2; ship bfloat16 "
                         "or float32 instead")

    size = DEFAULT_WEIGHTS.stat().st_size
    if size > SIZE_LIMIT:
        raise SystemExit(f"{DEFAULT_WEIGHTS} is {size / 1e6:.1f} MB, over the 25 MB limit")
    digest = hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest()
    with atomic_path(DEFAULT_WEIGHTS.with_suffix(".sha256")) as tmp:
        Path(tmp).write_text(f"{digest}  {DEFAULT_WEIGHTS.name}\n")
    print(f"{DEFAULT_WEIGHTS} ({size / 1e6:.1f} MB, sha256 {digest[:16]}...): "
          f"{model.inference_settings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
