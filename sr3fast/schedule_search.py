"""`sr3fast tune-schedule`: the paper's inference-schedule search, on your model and images.

SR3 conditions on the noise level g, not on a step index, so the levels a sampler visits can be
chosen after training; the paper picked its inference schedules by searching (sec. 4; Chen et
al. 2021 do the same for WaveGrad). The family searched here is sr3fast's "lambda" schedule
(sr3fast.diffusion.lambda_levels): levels placed by half log-SNR lambda = 0.5·log(g/(1 - g))

    from lambda_start  (where sampling starts: fixed, the model's recommended start_gamma, else
                        its training schedule's noisiest level)
    to   lambda_end    (the cleanest level before the final x0 estimate)       searched
    with spacing rho   (1: even in lambda; > 1: finer at high noise)           searched

Objective, stated: the mean PSNR over the held-out crops, subject to a sharpness guard: the mean
sharpness ratio (sr3fast.evaluation's high-frequency energy, output over truth) must be at
least `guard` (default 0.9) times that of a baseline measured on the same crops: the model's
current recommended settings (baseline="recommended", cheap), or the ancestral chain over
every training level from the start (baseline="ancestral": the quality few steps must keep). PSNR alone rewards blur (the conditional mean maximises it); the guard makes
blur lose. Candidates that fail the guard are reported and never chosen.

Search: a grid over the (lambda_end, rho) box, then `rounds` finer grids around the best point,
each half the previous span (`grid_search`). Every candidate is scored on the same crops with
the same seed, so differences are the schedule's, not the noise's.

The schedule chosen for the recommended step count (the fewest steps whose PSNR is within
`slack` dB of the best step count's) is written into the model's metadata with the sampler
(`InferenceSettings`); upscale then uses it by default, at any step count (a lambda schedule
keeps its endpoints and spacing when re-stepped).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .evaluation import check_images, crop_to_multiple, degrade, find_images, image_metrics, \
    load_ground_truth, model_scale
from .inference_settings import InferenceSettings
from .train.data import quantize

# Bounds of the search box. lambda_end: from just past the start to g = 1 - 2e-9; the public
# training schedule's cleanest level (g_1 = 1 - 1e-6) is lambda 6.9. rho: from coarse-early
# (0.5) to fine-early (3).
LAMBDA_END_RANGE = (1.0, 10.0)
BASELINES = ("recommended", "ancestral")
RHO_RANGE = (0.5, 3.0)


@dataclass(frozen=True)
class Box:
    """A search box: one (low, high) range per parameter, in order."""
    names: tuple[str, ...]
    ranges: tuple[tuple[float, float], ...]

    def grid(self, points: Sequence[int]) -> list[tuple[float, ...]]:
        axes = [torch.linspace(lo, hi, n, dtype=torch.float64).tolist() if n > 1 else [(lo + hi) / 2]
                for (lo, hi), n in zip(self.ranges, points)]
        grid = [()]
        for axis in axes:
            grid = [point + (value,) for point in grid for value in axis]
        return grid

    def around(self, centre: Sequence[float], shrink: float) -> "Box":
        """A box of `shrink` times this one's spans, centred on `centre`, kept inside this one."""
        ranges = []
        for (lo, hi), c in zip(self.ranges, centre):
            half = (hi - lo) * shrink / 2
            low, high = max(lo, c - half), min(hi, c + half)
            ranges.append((low, high))
        return Box(self.names, tuple(ranges))


@dataclass
class Trial:
    params: dict[str, float]
    score: float                 # -inf when infeasible
    metrics: dict[str, float] = field(default_factory=dict)


def grid_search(objective: Callable[[dict[str, float]], Trial], box: Box, points: Sequence[int],
                rounds: int = 1, shrink: float = 0.5, on_trial: Callable[[Trial], None] | None = None
                ) -> tuple[Trial, list[Trial]]:
    """Maximise objective over `box`: a grid of `points` per parameter, then `rounds` grids of the
    same size over a box `shrink` times smaller around the best so far. Returns (best, every
    trial). Points already scored are not scored again."""
    trials: dict[tuple, Trial] = {}
    best = None
    for round_index in range(rounds + 1):
        region = box if best is None else region.around(tuple(best.params.values()), shrink)
        for point in region.grid(points):
            key = tuple(round(v, 9) for v in point)
            if key in trials:
                continue
            trial = objective(dict(zip(box.names, point)))
            trials[key] = trial
            if on_trial is not None:
                on_trial(trial)
            if best is None or trial.score > best.score:
                best = trial
        if round_index == 0 and best is not None and best.score == -math.inf:
            break            # nothing feasible: refining around an arbitrary point is meaningless
    return best, list(trials.values())


def lambda_of(gamma: float) -> float:
    return 0.5 * math.log(gamma / (1 - gamma))


def schedule_dict(steps: int, lambda_start: float, lambda_end: float, rho: float) -> dict:
    return {"schedule": "lambda", "n_timestep": int(steps), "lambda_start": float(lambda_start),
            "lambda_end": float(lambda_end), "rho": float(rho)}


def ancestral_schedule(model, start_gamma: float | None):
    """The model's training schedule, truncated at start_gamma when given: the levels the full
    ancestral chain visits (the few-step samplers' quality reference)."""
    from .diffusion import NoiseSchedule, truncate

    schedule = NoiseSchedule.from_config(model.config.schedule)
    return truncate(schedule, start_gamma) if start_gamma else schedule


def sampling_start(model) -> tuple[float, float | None]:
    """(lambda_start, start_gamma): where the tuned schedules start. From the noised input at the
    model's recommended start_gamma when it has one (start_gamma returned), else from pure noise
    at its training schedule's noisiest level (start_gamma None)."""
    from .diffusion import NoiseSchedule

    settings = getattr(model, "inference_settings", None)
    if settings is not None and settings.start_gamma:
        return lambda_of(settings.start_gamma), settings.start_gamma
    g_T = NoiseSchedule.from_config(model.config.schedule).gammas[-1].item()
    return lambda_of(g_T), None


def crops_of(paths: Sequence[Path], size: int, per_image: int, scale: int) -> list[tuple[str, torch.Tensor]]:
    """Ground-truth crops (name, (1, 3, size, size) in [0, 1]): `per_image` of them per image, at
    fixed positions spread along the image's diagonal (deterministic); whole images smaller
    than `size` are used whole (cropped to a multiple of the scale)."""
    crops = []
    for path in paths:
        truth = load_ground_truth(path)
        height, width = truth.shape[-2:]
        if height < size or width < size:
            crops.append((path.name, crop_to_multiple(truth, scale)))
            continue
        for k in range(per_image):
            f = (k + 1) / (per_image + 1)
            top, left = round((height - size) * f), round((width - size) * f)
            crops.append((f"{path.name}@{left},{top}", truth[..., top:top + size, left:left + size]))
    return crops


class CropScorer:
    """Upscales the degraded crops with given settings and averages sr3fast eval's metrics."""

    def __init__(self, model, crops: list[tuple[str, torch.Tensor]], seed: int, back_projections: int):
        self.model, self.seed, self.back_projections = model, seed, back_projections
        scale = model_scale(model)
        self.items = [(truth, degrade(truth, scale)) for _, truth in crops]

    def __call__(self, **settings) -> dict[str, float]:
        from .api import upscale

        totals: dict[str, float] = {}
        for truth, low in self.items:
            output = quantize(upscale(low, model=self.model, seed=self.seed, progress=False,
                                      back_projections=self.back_projections, **settings).float().cpu())
            (metrics,) = image_metrics(output, truth, low)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
        return {key: value / len(self.items) for key, value in totals.items()}


@dataclass
class StepResult:
    steps: int
    best: Trial
    trials: list[Trial]


@dataclass
class TuneReport:
    sampler: str
    lambda_start: float
    start_gamma: float | None
    guard: float
    baseline: dict            # the current recommended settings and their metrics
    results: list[StepResult]
    chosen_steps: int | None

    def table(self) -> str:
        lines = [f"baseline ({self.baseline['description']}): PSNR {self.baseline['psnr']:.2f}, "
                 f"SSIM {self.baseline['ssim']:.4f}, sharpness {self.baseline['sharpness_ratio']:.3f}; "
                 f"guard: sharpness >= {self.guard:.2f} x {self.baseline['sharpness_ratio']:.3f}",
                 f"{'steps':>5s} {'lambda_end':>10s} {'rho':>5s} {'PSNR':>7s} {'SSIM':>7s} "
                 f"{'consist.':>8s} {'sharp.':>7s} {'tried':>5s} {'feasible':>8s}"]
        for r in self.results:
            feasible = sum(t.score > -math.inf for t in r.trials)
            if r.best.score == -math.inf:
                lines.append(f"{r.steps:5d} {'-':>10s} {'-':>5s} {'no candidate passed the guard':>40s} "
                             f"{len(r.trials):5d} {feasible:8d}")
                continue
            m = r.best.metrics
            lines.append(f"{r.steps:5d} {r.best.params['lambda_end']:10.3f} {r.best.params['rho']:5.2f} "
                         f"{m['psnr']:7.2f} {m['ssim']:7.4f} {m['consistency']:8.1e} "
                         f"{m['sharpness_ratio']:7.3f} {len(r.trials):5d} {feasible:8d}"
                         + ("  <- recommended" if r.steps == self.chosen_steps else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "lambda_start": self.lambda_start,
                "start_gamma": self.start_gamma, "guard": self.guard, "baseline": self.baseline,
                "chosen_steps": self.chosen_steps,
                "results": [{"steps": r.steps, "best": _trial_dict(r.best),
                             "trials": [_trial_dict(t) for t in r.trials]} for r in self.results]}

    def settings(self, back_projections: int, steps: int | None = None) -> InferenceSettings | None:
        """The recommended settings this search supports (at `steps`, one of the step counts
        searched, instead of the recommended count when given), or None when nothing passed the
        guard there."""
        steps = self.chosen_steps if steps is None else steps
        if steps is None:
            return None
        found = [r.best for r in self.results if r.steps == steps]
        if not found:
            searched = ", ".join(str(r.steps) for r in self.results)
            raise ValueError(f"{steps} steps were not searched (searched: {searched})")
        if found[0].score == -math.inf:
            return None
        schedule = schedule_dict(steps, self.lambda_start, **found[0].params)
        return InferenceSettings(sampler=self.sampler, steps=steps, schedule=schedule,
                                 start_gamma=self.start_gamma, back_projections=back_projections)

    @classmethod
    def from_dict(cls, data: dict, guard: float | None = None, slack: float = 0.1) -> "TuneReport":
        """A report read back from write_report_json's file, its candidates judged again under
        `guard` (default: the file's) and the step count chosen again under `slack`: another
        guard or slack without running the search again (over the candidates it scored; a new
        search could refine around other points)."""
        guard = data["guard"] if guard is None else guard
        floor = guard * data["baseline"]["sharpness_ratio"]
        results = []
        for r in data["results"]:
            trials = []
            for t in r["trials"]:
                m = t["metrics"]
                feasible = m["sharpness_ratio"] >= floor and math.isfinite(m["psnr"])
                trials.append(Trial(t["params"], m["psnr"] if feasible else -math.inf, m))
            results.append(StepResult(r["steps"], max(trials, key=lambda t: t.score), trials))
        return cls(data["sampler"], data["lambda_start"], data["start_gamma"], guard, data["baseline"],
                   results, choose_steps(results, slack))


def _trial_dict(trial: Trial) -> dict:
    return {"params": trial.params, "score": None if trial.score == -math.inf else trial.score,
            "metrics": trial.metrics}


def choose_steps(results: list[StepResult], slack: float) -> int | None:
    """The fewest steps whose best PSNR is within `slack` dB of the best over all step counts."""
    feasible = [r for r in results if r.best.score > -math.inf]
    if not feasible:
        return None
    top = max(r.best.metrics["psnr"] for r in feasible)
    return min(r.steps for r in feasible if r.best.metrics["psnr"] >= top - slack)


def tune_schedule(model, paths: Sequence[str | Path], steps: Sequence[int], *, sampler: str | None = None,
                  crop: int = 128, crops_per_image: int = 2, seed: int = 0, guard: float = 0.9,
                  points: Sequence[int] = (4, 3), rounds: int = 1, slack: float = 0.1,
                  baseline: str = "recommended", progress: bool = True) -> TuneReport:
    """Search the lambda schedule's (lambda_end, rho) for each step count in `steps` on crops of
    the ground-truth images `paths` (folders expanded), as the module docstring describes."""
    from .api import _back_projections, _settings
    from .diffusion import SAMPLERS

    steps = sorted(set(_check_steps(steps)))
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 0 < guard <= 2:
        raise ValueError(f"guard must lie in (0, 2] (a fraction of the baseline's sharpness), got {guard!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if crop < 8 or crops_per_image < 1:
        raise ValueError(f"crop must be >= 8 pixels and crops_per_image >= 1, got {crop}, {crops_per_image}")
    paths = find_images([str(p) for p in paths])
    scale = model_scale(model)
    check_images(paths, scale)
    base_sampler, base_steps, base_schedule, base_start = _settings(model, None, None, None)
    sampler = sampler or base_sampler
    back_projections = _back_projections(model, None)
    lambda_start, start_gamma = sampling_start(model)
    scorer = CropScorer(model, crops_of(paths, crop - crop % scale, crops_per_image, scale), seed,
                        back_projections)

    if baseline == "ancestral":
        chain = ancestral_schedule(model, start_gamma)
        baseline = scorer(sampler="posterior", schedule=chain,
                          start_gamma=chain.gammas[-1].item() if start_gamma else None)
        baseline["description"] = (f"posterior, every training level {'below start_gamma ' if start_gamma else ''}"
                                   f"({chain.num_steps} steps)")
    else:
        baseline = scorer()
        baseline["description"] = (f"{base_sampler}, {base_steps} steps, "
                                   f"{'tuned schedule' if base_schedule else 'training schedule'}"
                                   f"{f', start_gamma {base_start}' if base_start else ''}")
    floor = guard * baseline["sharpness_ratio"]
    box = Box(("lambda_end", "rho"),
              ((max(LAMBDA_END_RANGE[0], lambda_start + 0.5), LAMBDA_END_RANGE[1]), RHO_RANGE))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        per_step = math.prod(points) * (rounds + 1)
        bar = tqdm(total=per_step * len(steps), desc="tune-schedule", unit="candidate")

    results = []
    for n in steps:
        def objective(params: dict[str, float], n=n) -> Trial:
            schedule = schedule_dict(n, lambda_start, **params)
            metrics = scorer(sampler=sampler, schedule=schedule, start_gamma=start_gamma)
            feasible = metrics["sharpness_ratio"] >= floor and math.isfinite(metrics["psnr"])
            return Trial(params, metrics["psnr"] if feasible else -math.inf, metrics)

        def advance(trial: Trial) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(steps=n, psnr=f"{trial.metrics['psnr']:.2f}")

        if n == 1:          # one step: the level lambda_start only; nothing to search
            trial = objective({"lambda_end": box.ranges[0][1], "rho": 1.0})
            advance(trial)
            results.append(StepResult(n, trial, [trial]))
            continue
        best, trials = grid_search(objective, box, points, rounds, on_trial=advance)
        results.append(StepResult(n, best, trials))
    if bar is not None:
        bar.close()
    return TuneReport(sampler, lambda_start, start_gamma, guard, baseline, results,
                      choose_steps(results, slack))


def _check_steps(steps) -> list[int]:
    if not steps:
        raise ValueError("give at least one step count (e.g. --steps 10,20,50)")
    for n in steps:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"step counts must be positive integers, got {n!r}")
    return list(steps)


def parse_steps(text: str) -> list[int]:
    """'10,20,50' -> [10, 20, 50], or ValueError saying what is wrong."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--steps takes comma-separated positive integers like 10,20,50; got {text!r}") from None
    return _check_steps(values)


def write_report_json(report: TuneReport, path: str | Path) -> Path:
    from .atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n")
    return path
