"""Tiled sampling on this machine's CPU with the default model (issue 13's measurements).

    nice -n 19 python bench/tiling_bench.py [--threads 2] [--big-steps 1]

1. cost of tiling against untiled at 256x256 output (both fit): seconds per sampling step;
2. seams with forced small tiles: the mean squared horizontal (vertical) difference across the
   columns (rows) where tiles begin or end, over the same statistic on all other columns (rows);
   1.0 is seam-free; the untiled image at the same positions is the baseline;
3. a 1024x768 photo upscaled 4x (4096x3072 output): tile=None's plan; the time and the peak
   memory of ONE pass of the U-Net over the planned crops_per_call tiles, extrapolated to a step
   (all tiles) and to the recommended 50 steps (a full run takes hours on 2 shared cores; the
   extrapolation is said as such).
Timings are medians of repeats after a warm-up step; peak memory from sr3fast.tiling.PeakMemory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from PIL import Image

import sr3fast
from sr3fast.diffusion import NoiseSchedule, respace, truncate
from sr3fast.tiling import PeakMemory, TiledDenoiser, available_memory, plan


def step_seconds(denoiser, x, y, gamma, repeats=3):
    denoiser(x, y, gamma)                                   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        denoiser(x, y, gamma)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seam_ratio(image: torch.Tensor, borders_h: list[int], borders_w: list[int]) -> float:
    """Gradient energy across tile borders over the interior's, both axes pooled."""
    dx = (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean(dim=(0, 1, 2))   # per column gap c-1|c
    dy = (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean(dim=(0, 1, 3))
    cols = torch.zeros_like(dx, dtype=torch.bool)
    rows = torch.zeros_like(dy, dtype=torch.bool)
    for c in borders_w:
        if 0 < c < image.shape[-1]:
            cols[c - 1] = True
    for r in borders_h:
        if 0 < r < image.shape[-2]:
            rows[r - 1] = True
    border = torch.cat([dx[cols], dy[rows]]).mean()
    interior = torch.cat([dx[~cols], dy[~rows]]).mean()
    return (border / interior).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seam-steps", type=int, default=10, help="sampling steps for the seam run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = sr3fast.load("default")
    settings = model.inference_settings
    print(f"torch {torch.__version__}, {args.threads} threads; default model, recommended: "
          f"{settings.sampler}, {settings.steps} steps, start_gamma {settings.start_gamma}, "
          f"{settings.back_projections} back-projections")
    gamma = torch.full((1,), 0.3)

    # 1. tiling cost at 256x256
    photo = Image.open("examples/coffee_64.png").convert("RGB")
    x = torch.from_numpy(__import__("numpy").asarray(photo).copy()).permute(2, 0, 1)[None].float() / 255
    cond = F.interpolate(x * 2 - 1, size=(256, 256), mode="bicubic", antialias=True).clamp(-1, 1)
    y = torch.randn_like(cond)
    with torch.no_grad():
        untiled = step_seconds(model.predict_noise, cond, y, gamma)
        print(f"\n1. 256x256 output, one denoiser call (one step): untiled {untiled:.3f} s")
        for tile, overlap in ((128, 32), (64, 16)):
            tiler = TiledDenoiser(model, tile, overlap)
            count = tiler.plan(256, 256).count
            tiled = step_seconds(tiler.denoiser_for(cond, "python"), cond, y, gamma)
            print(f"   tile {tile}, overlap {overlap} ({count} tiles): {tiled:.3f} s "
                  f"({tiled / untiled:.2f}x untiled)")

    # 2. seams with forced small tiles, full recommended sampling
    common = dict(model=model, seed=0, progress=False, steps=args.seam_steps)
    start = time.perf_counter()
    plain = sr3fast.upscale(x, tile=False, **common)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    tiled = sr3fast.upscale(x, tile=64, tile_overlap=16, **common)
    tiled_s = time.perf_counter() - start
    layout = TiledDenoiser(model, 64, 16).plan(256, 256)
    borders_h = sorted({t for t in layout.tops} | {t + layout.tile_height for t in layout.tops})
    borders_w = sorted({l for l in layout.lefts} | {l + layout.tile_width for l in layout.lefts})
    print(f"\n2. 64->256 photo, recommended sampling but {args.seam_steps} steps: untiled {plain_s:.1f} s, tile 64/16 "
          f"{tiled_s:.1f} s; tile borders at rows {borders_h}, columns {borders_w}")
    print(f"   seam ratio (border/interior gradient energy): tiled {seam_ratio(tiled, borders_h, borders_w):.3f}, "
          f"untiled at the same positions {seam_ratio(plain, borders_h, borders_w):.3f}")
    print(f"   tiled vs untiled: mean |diff| {(tiled - plain).abs().mean().item():.4f} (of [0, 1])")

    # 3. a 1024x768 photo 4x
    height, width = 3072, 4096
    budget = available_memory("cpu")
    chosen = plan(model, 1, height, width, budget, "cpu", torch.float32)
    print(f"\n3. 1024x768 -> 4096x3072: budget {budget / 2**30:.1f} GiB (75% of available RAM); "
          f"untiled would need about {plan(model, 1, height, width, 2**62, 'cpu', torch.float32).estimate / 2**30:.1f} GiB; "
          f"tile=None picks {chosen}")
    tile = chosen.tile
    crops = chosen.crops_per_call
    layout = TiledDenoiser(model, tile).plan(height, width)
    xs = torch.zeros(crops, 3, layout.tile_height, layout.tile_width)
    with torch.no_grad():
        model.predict_noise(xs[:1], xs[:1], gamma)            # warm-up at this shape
        with PeakMemory("cpu") as peak:
            start = time.perf_counter()
            model.predict_noise(xs, xs, gamma.expand(crops))
            one_pass = time.perf_counter() - start
    passes = -(-layout.count // crops)
    steps = len(respace(truncate(NoiseSchedule.from_config(model.config.schedule), settings.start_gamma),
                        settings.steps).gammas)
    canvas = 16 * 3 * 4 * height * width
    print(f"   {layout.count} tiles of {layout.tile_height}x{layout.tile_width}, {crops} per pass: one pass "
          f"{one_pass:.1f} s, peak {peak.bytes / 2**30:.2f} GiB (+ the canvas state, about "
          f"{canvas / 2**30:.2f} GiB); EXTRAPOLATED: {passes} passes -> {passes * one_pass:.0f} s a step, "
          f"{steps} steps -> {passes * one_pass * steps / 3600:.1f} h for the image")


if __name__ == "__main__":
    main()
