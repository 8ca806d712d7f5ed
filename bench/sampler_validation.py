"""Few-step sampling against the 1000-step ancestral reference, on a trained model.

    python bench/sampler_validation.py --model default --out bench/results/samplers-default.json

Every sampler x step count upscales the same held-out ground-truth crops (degraded as
`sr3fast eval` does: antialiased bicubic, 8 bits) with the same seed, the same start (the
model's recommended start_gamma, else pure noise) and the same back-projections, over the
model's training schedule truncated at the start and respaced to the step count ("training"),
or (--schedules) levels spaced evenly in log-SNR from the start to the training schedule's
cleanest level ("lambda": what DPM-Solver steps over; untuned), or the model's own tuned
schedule ("tuned", when it has one, for its tuned sampler). Rerun with the same --out to add
rows: rows already there (same sampler, steps asked and schedule) are kept, not run again. Reported per row: PSNR, SSIM, consistency, sharpness
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
from sr3fast.schedule_search import crops_of, lambda_of, sampling_start, schedule_dict  # noqa: E402
from sr3fast.train.data import quantize  # noqa: E402

SAMPLERS = ("posterior", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "dpmpp_3m_sde")
STEPS = (100, 50, 25, 20, 10, 5)
REFERENCE = ("posterior", 1000)


def training_schedule(model, steps: int, start_gamma: float | None) -> NoiseSchedule:
    schedule = NoiseSchedule.from_config(model.config.schedule)
    if start_gamma:
        schedule = truncate(schedule, start_gamma)
    return respace(schedule, min(steps, schedule.num_steps))


def cleanest_lambda(model) -> float:
    """Half log-SNR of the training schedule's cleanest level, g_1 = 1 - beta_1."""
    return lambda_of(NoiseSchedule.from_config(model.config.schedule).gammas[0].item())


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


# The goal of few-step sampling against the ancestral reference (the issue's; README).
GOAL = {"psnr": 0.3, "ssim": 0.01, "consistency": 1.2, "sharpness_ratio": 0.10}


def meets_goal(row: dict, reference: dict) -> bool:
    """PSNR at most 0.3 dB and SSIM at most 0.01 below the reference, consistency at most 1.2x
    its, sharpness within 10% of it either way (sharper is not better: it may be noise)."""
    return (row["psnr"] >= reference["psnr"] - GOAL["psnr"]
            and row["ssim"] >= reference["ssim"] - GOAL["ssim"]
            and row["consistency"] <= GOAL["consistency"] * reference["consistency"]
            and abs(row["sharpness_ratio"] / reference["sharpness_ratio"] - 1) <= GOAL["sharpness_ratio"])


def markdown(record: dict, schedules: tuple[str, ...] = ("lambda", "tuned", "training")) -> str:
    """The rows of a results file as a markdown table, the reference first, each row marked
    where it meets GOAL against the reference."""
    rows = record["rows"]
    reference = next(r for r in rows if (r["sampler"], r["asked"]) == REFERENCE and r["schedule"] == "training")
    names = {"training": "training, by index", "lambda": "even in log-SNR", "tuned": "tuned"}
    lines = ["| sampler | schedule | steps | PSNR | SSIM | consistency | sharpness | s/crop | goal |",
             "|---|---|---|---|---|---|---|---|---|"]

    def line(r, goal):
        return (f"| {r['sampler']} | {names[r['schedule']]} | {r['steps']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                f"{r['consistency']:.2e} | {r['sharpness_ratio']:.3f} | {r['seconds_per_crop']:.2f} | {goal} |")

    lines.append(line(reference, "reference"))
    order = {name: i for i, name in enumerate(SAMPLERS)}
    rows = sorted(rows, key=lambda r: (order.get(r["sampler"], len(order)), -r["steps"]))
    for schedule in schedules:
        for r in rows:
            if r["schedule"] == schedule and r is not reference:
                lines.append(line(r, "yes" if meets_goal(r, reference) else ""))
    b = record["bicubic"]
    lines.append(f"| bicubic | | | {b['psnr']:.2f} | {b['ssim']:.4f} | {b['consistency']:.2e} | "
                 f"{b['sharpness_ratio']:.3f} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--markdown"]:           # print a results file as a table
        shower = argparse.ArgumentParser(prog="sampler_validation.py --markdown")
        shower.add_argument("results")
        shower.add_argument("--schedules", default="lambda,tuned,training")
        shown = shower.parse_args(argv[1:])
        print(markdown(json.loads(Path(shown.results).read_text()), tuple(shown.schedules.split(","))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="python bench/sampler_validation.py --markdown RESULTS.json "
                                            "prints a results file as a markdown table")
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(ROOT / "data" / "photos" / "val"),
                        help="held-out ground-truth images (default data/photos/val)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--crops-per-image", type=int, default=2)
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--steps", default=",".join(map(str, STEPS)))
    parser.add_argument("--no-reference", action="store_true", help="skip the 1000-step row")
    parser.add_argument("--schedules", default="training",
                        help="comma-separated: training, lambda, tuned (default training)")
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
    settings = getattr(model, "inference_settings", None)
    schedules = args.schedules.split(",")
    unknown = set(schedules) - {"training", "lambda", "tuned"}
    if unknown:
        parser.error(f"unknown --schedules {sorted(unknown)}: choose from training, lambda, tuned")
    if "tuned" in schedules and (settings is None or settings.schedule is None):
        parser.error(f"{args.model} has no tuned schedule (sr3fast tune-schedule writes one)")
    plan = [] if args.no_reference else [(*REFERENCE, "training")]
    for label in schedules:
        samplers = [settings.sampler] if label == "tuned" else args.samplers.split(",")
        plan += [(s, int(n), label) for s in samplers for n in args.steps.split(",")]

    out = Path(args.out)
    record = {"model": args.model, "machine": platform.processor() or platform.machine(),
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "crops": [name for name, _ in crops], "crop": truth.shape[-1], "scale": scale,
              "start_gamma": start_gamma, "back_projections": back_projections, "seed": args.seed,
              "rows": []}
    if out.exists():       # add to an earlier run of the same comparison
        earlier = json.loads(out.read_text())
        same = ("model", "crops", "crop", "start_gamma", "back_projections", "seed")
        if any(earlier.get(key) != record[key] for key in same):
            parser.error(f"{out} holds another comparison (model, crops, start or seed differ); "
                         "pass another --out")
        record["rows"] = earlier["rows"]
    done = {(row["sampler"], row["asked"], row["schedule"]) for row in record["rows"]}
    b_metrics = image_metrics(bicubic_upscale(low, scale), truth, low)
    record["bicubic"] = {key: sum(m[key] for m in b_metrics) / len(b_metrics) for key in b_metrics[0]}
    lambda_start, _ = sampling_start(model)
    for sampler, steps, label in plan:
        if (sampler, steps, label) in done:
            continue
        if label == "tuned":
            schedule = NoiseSchedule.from_config({**settings.schedule, "n_timestep": steps})
        elif label == "lambda":
            schedule = NoiseSchedule.from_config(
                schedule_dict(steps, lambda_start, cleanest_lambda(model), rho=1.0))
        else:
            schedule = training_schedule(model, steps, start_gamma)
        row = run_row(model, truth, low, sampler, schedule, start_gamma, back_projections, args.seed)
        # steps: the network evaluations run, which is fewer than asked where the truncated
        # training schedule has fewer levels (the 1000-step reference from start_gamma).
        row.update(sampler=sampler, steps=schedule.num_steps, asked=steps, schedule=label)
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
