"""Few-step sampling against the 1000-step ancestral reference, on a trained model.

    python bench/sampler_validation.py --model default --out bench/results/samplers-default.json

Every sampler x step count upscales the same held-out ground-truth crops (degraded as
`sr3fast eval` does: antialiased bicubic, 8 bits) with the same seed, the same start (the
model's recommended start_gamma, else pure noise) and the same back-projections, over the
model's training schedule truncated at the start and respaced to the step count (plus, with
--tuned, the model's own tuned schedule). Reported per row: PSNR, SSIM, consistency, sharpness
ratio (sr3fast.evaluation.image_metrics, averaged over the crops) and seconds per crop (the
crops go through the U-Net as one batch; the machine is named in the JSON).

The 1000-step row is the ancestral (posterior) sampler: the quality few-step samplers must keep.
Started from the input at start_gamma, it runs every level of the training schedule below
start_gamma when there are fewer than 1000 (the row records the steps actually run).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sr3fast  # noqa: E402
from sr3fast.api import _back_projections  # noqa: E402
from sr3fast.diffusion import NoiseSchedule, respace, truncate  # noqa: E402
from sr3fast.evaluation import bicubic_upscale, degrade, find_images, image_metrics, model_scale  # noqa: E402
from sr3fast.schedule_search import crops_of, sampling_start  # noqa: E402
from sr3fast.train.data import quantize  # noqa: E402

SAMPLERS = ("posterior", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
STEPS = (100, 50, 25, 20, 10, 5)
REFERENCE = ("posterior", 1000)


def training_schedule(model, steps: int, start_gamma: float | None) -> NoiseSchedule:
    schedule = NoiseSchedule.from_config(model.config.schedule)
    if start_gamma:
        schedule = truncate(schedule, start_gamma)
    return respace(schedule, min(steps, schedule.num_steps))


def run_row(model, truth, low, sampler, schedule, start_gamma, back_projections, seed) -> dict:
    started = time.perf_counter()
    output = sr3fast.upscale(low, model=model, sampler=sampler, schedule=schedule,
                             start_gamma=schedule.gammas[-1].item() if start_gamma else None,
                             back_projections=back_projections, seed=seed, progress=False)
    seconds = time.perf_counter() - started
    metrics = image_metrics(quantize(output.float().cpu()), truth, low)
    row = {key: sum(m[key] for m in metrics) / len(metrics) for key in metrics[0]}
    row["seconds_per_crop"] = seconds / truth.shape[0]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(ROOT / "data" / "photos" / "val"),
                        help="held-out ground-truth images (default data/photos/val)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--crops-per-image", type=int, default=2)
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--steps", default=",".join(map(str, STEPS)))
    parser.add_argument("--no-reference", action="store_true", help="skip the 1000-step row")
    parser.add_argument("--tuned", action="store_true",
                        help="also rows over the model's tuned (recommended) schedule")
    parser.add_argument("--start-gamma", type=float, default=None,
                        help="override the start (default: the model's recommended)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON to write (rows appended as they finish)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = sr3fast.load(args.model)
    scale = model_scale(model)
    _, start_gamma = sampling_start(model)
    if args.start_gamma is not None:
        start_gamma = args.start_gamma or None
    back_projections = _back_projections(model, None)
    crops = crops_of(find_images([args.data]), args.crop - args.crop % scale, args.crops_per_image, scale)
    truth = torch.cat([c for _, c in crops])
    low = degrade(truth, scale)
    plan = [] if args.no_reference else [REFERENCE]
    plan += [(s, int(n)) for s in args.samplers.split(",") for n in args.steps.split(",")]
    settings = getattr(model, "inference_settings", None)
    if args.tuned and settings is not None and settings.schedule is not None:
        plan += [(settings.sampler, -int(n)) for n in args.steps.split(",")]   # negative: tuned

    out = Path(args.out)
    record = {"model": args.model, "machine": platform.processor() or platform.machine(),
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "crops": [name for name, _ in crops], "crop": truth.shape[-1], "scale": scale,
              "start_gamma": start_gamma, "back_projections": back_projections, "seed": args.seed,
              "rows": []}
    b_metrics = image_metrics(bicubic_upscale(low, scale), truth, low)
    record["bicubic"] = {key: sum(m[key] for m in b_metrics) / len(b_metrics) for key in b_metrics[0]}
    for sampler, steps in plan:
        if steps < 0:
            schedule = NoiseSchedule.from_config({**settings.schedule, "n_timestep": -steps})
            label = "tuned"
        else:
            schedule = training_schedule(model, steps, start_gamma)
            label = "training"
        row = run_row(model, truth, low, sampler, schedule, start_gamma, back_projections, args.seed)
        # steps: the network evaluations run, which is fewer than asked where the truncated
        # training schedule has fewer levels (the 1000-step reference from start_gamma).
        row.update(sampler=sampler, steps=schedule.num_steps, asked=abs(steps), schedule=label)
        record["rows"].append(row)
        print(f"{sampler:13s} {schedule.num_steps:5d} {label:8s} PSNR {row['psnr']:6.2f} SSIM {row['ssim']:.4f} "
              f"cons {row['consistency']:.2e} sharp {row['sharpness_ratio']:.3f} "
              f"{row['seconds_per_crop']:.2f} s/crop", flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
