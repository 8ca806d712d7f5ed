"""One large photo upscaled whole with the default model: seconds, peak memory and the tiling
upscale chose for the device's memory (tile=None).

    python bench/large_image.py --device cuda --low 1024          # 1024x1024 -> 4096x4096
    python bench/large_image.py --device cpu --low 64 --steps 2   # a smoke run

The input is scikit-image's astronaut photo (512x512) resized to LOW x LOW, so the output is a
real photo's content at 4 x LOW a side. The model's recommended sampling unless --steps is given.
Peak memory: the CUDA caching allocator's peak, or the process's peak resident memory on a CPU
(sr3fast.tiling.PeakMemory). Prints one JSON line; --json also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sr3fast  # noqa: E402
from sr3fast.tiling import PeakMemory, available_memory, tiler_for  # noqa: E402
from sr3fast.train.data import resize  # noqa: E402


def photo(low: int) -> torch.Tensor:
    from skimage.data import astronaut

    image = torch.from_numpy(astronaut().copy()).permute(2, 0, 1)[None].float() / 255
    return resize(image, (low, low)).clamp(0, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--low", type=int, default=1024, help="input side (default 1024: 4096 out)")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's recommended")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on a CPU, the checkpoint's (float16) on a GPU")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else None)
    model = sr3fast.load("default", device=device, dtype=dtype)
    x = photo(args.low).to(device)
    scale = model.config.high_res // model.config.low_res
    side = args.low * scale
    parameter = next(model.parameters())
    tiler = tiler_for(model, (1, 3, side, side), device, parameter.dtype, None)
    chosen = "untiled" if tiler is None else \
        f"tile {tiler.tile}, overlap {tiler.overlap}, {tiler.plan(side, side).count} tiles, " \
        f"{tiler.crops_per_call} per pass"
    print(f"{args.low}x{args.low} -> {side}x{side} on {device} ({parameter.dtype}); memory budget "
          f"{available_memory(device) / 2**30:.1f} GiB: {chosen}", flush=True)

    sr3fast.upscale(photo(16).to(device), model=model, steps=1, seed=0, progress=False)   # warm-up
    with PeakMemory(device) as peak:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = sr3fast.upscale(x, model=model, steps=args.steps, seed=0, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    settings = model.inference_settings
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "input": [args.low, args.low], "output": list(out.shape[-2:]), "dtype": str(parameter.dtype),
              "sampler": settings.sampler, "steps": args.steps or settings.steps, "tiling": chosen,
              "seconds": seconds, "peak_bytes": peak.bytes, "peak_gib": peak.bytes / 2**30,
              "finite": bool(torch.isfinite(out).all())}
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
