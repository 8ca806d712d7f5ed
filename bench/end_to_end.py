"""End to end: seconds per image as a user feels them, sr3fast's validated default against the
public SR3 code's default, with the same U-Net weights, measured in one run.

    public default   2000 ancestral steps (the posterior sampler, x0 clipped) over the model's
                     full training schedule from pure noise, the reference backend (plain
                     PyTorch, eager, float32): what the widely used public code does per image
    ancestral        the quality reference of the sampler validation (bench/sampler_validation.py):
                     the posterior sampler over every training level from the model's recommended
                     start, with its back-projections, the fastest available backend; only for a
                     model that starts from the noised input (else it is the public default)
    sr3fast default  sr3fast.upscale(x) with nothing else given: the model's recommended sampler,
                     steps, schedule, start and back-projections (stored in its checkpoint), the
                     fastest available backend

Both upscale the same photo crop (coffee, from scikit-image) with the default 4x model, batch 1,
timed around the whole call (condition, sampling, output), after one untimed warm-up step.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from bench.records import ERROR, OK, Row

SUBJECT = "end-to-end"
PUBLIC_STEPS = 2000
PUBLIC = "public-default"
SR3FAST = "sr3fast-default"
ANCESTRAL = "ancestral"


def _photo(low_side: int) -> torch.Tensor:
    """A (1, 3, low_side, low_side) float crop of scikit-image's coffee photo in [0, 1]: the input."""
    from skimage.data import coffee

    from sr3fast.train.data import resize

    image = torch.from_numpy(coffee().copy()).permute(2, 0, 1)[None].float() / 255
    side = min(image.shape[-2:])
    square = image[..., :side, :side]
    return resize(square, (low_side, low_side)).clamp(0, 1)


def _time(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def run_end_to_end(device: torch.device, low_side: int, progress: Callable[[str], None],
                   on_row: Callable[[Row], None] = lambda row: None,
                   public_steps: int = PUBLIC_STEPS) -> list[Row]:
    """The public default, the ancestral reference (when the model starts from the input) and
    sr3fast's default, in that order: seconds per image in `extra["seconds_per_image"]` and median_ms."""
    import sr3fast
    from sr3fast.api import _back_projections, _settings
    from sr3fast.diffusion import NoiseSchedule, respace, truncate

    model = sr3fast.load("default", device=device)
    scale = model.config.high_res // model.config.low_res
    x = _photo(low_side).to(device)
    case = f"{low_side}->{low_side * scale}"
    sampler, steps, schedule, start = _settings(model, None, None, None)
    described = (f"{sampler}, {steps} steps, {'tuned schedule' if schedule else 'training schedule'}"
                 f"{f', start_gamma {start}' if start else ''}, "
                 f"{_back_projections(model, None)} back-projections, backend auto")
    training = NoiseSchedule.from_config(model.config.schedule)
    # fewer public steps only in smoke runs (--quick, --public-steps): the row then says so
    public_schedule = training if public_steps == training.num_steps else respace(training, public_steps)
    rows = []

    def public() -> torch.Tensor:
        with sr3fast.backend("reference"):
            return sr3fast.upscale(x, model=model, sampler="posterior", schedule=public_schedule, start_gamma=0,
                                   back_projections=0, seed=0, progress=False)

    def ours() -> torch.Tensor:
        return sr3fast.upscale(x, model=model, seed=0, progress=False)

    chain = truncate(training, start) if start else None
    smoke = public_steps != PUBLIC_STEPS
    if chain is not None and smoke and chain.num_steps > public_steps:
        chain = respace(chain, public_steps)     # a smoke run checks the rows run, not their time

    def ancestral() -> torch.Tensor:
        return sr3fast.upscale(x, model=model, sampler="posterior", schedule=chain,
                               start_gamma=chain.gammas[-1].item(), seed=0, progress=False)

    runs = [(PUBLIC, public, public_steps, f"posterior, {public_steps} steps, pure noise, reference backend "
                                           "(eager PyTorch, float32)"
             + ("" if public_steps == PUBLIC_STEPS else f"; a smoke run: the public default is {PUBLIC_STEPS}"))]
    if chain is not None:
        runs.append((ANCESTRAL, ancestral, chain.num_steps,
                     f"posterior, every training level from start_gamma {start}, "
                     f"{_back_projections(model, None)} back-projections, backend auto"
                     + (f"; a smoke run: {chain.num_steps} of those levels" if smoke else "")))
    runs.append((SR3FAST, ours, steps, described))
    sr3fast.upscale(x, model=model, steps=1, seed=0, progress=False)          # warm-up
    for name, fn, steps_run, note in runs:
        progress(f"end to end: {name} ({case}, {steps_run} steps)")
        row = Row(kind="end_to_end", subject=SUBJECT, case=case, implementation=name, dtype="float32",
                  batch=1, sampling_steps=steps_run, note=note, repeats=1, warmup=1)
        try:
            seconds = _time(fn, device)
            row.median_ms = row.min_ms = row.max_ms = seconds * 1e3
            row.images_per_s = 1 / seconds
            row.images_per_s_source = "measured"
            row.extra["seconds_per_image"] = seconds
        except Exception as err:   # a row that fails is reported, the run goes on
            row.status, row.reason = ERROR, f"{type(err).__name__}: {err}"
        rows.append(row)
        on_row(row)
    public_row, our_row = rows[0], rows[-1]
    if public_row.status == OK and our_row.status == OK:
        our_row.baseline = PUBLIC
        our_row.speedup = public_row.median_ms / our_row.median_ms
    if len(rows) == 3 and rows[1].status == OK and our_row.status == OK:
        our_row.extra["speedup_over_ancestral"] = rows[1].median_ms / our_row.median_ms
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"End to end, the default 4x model, batch 1 ({rows[0].case if rows else ''}):",
             f"{'':16s} {'steps':>6s} {'s/image':>9s} {'speedup':>8s}  settings"]
    for row in rows:
        if row.status != OK:
            lines.append(f"{row.implementation:16s} failed: {row.reason}")
            continue
        speedup = f"{row.speedup:7.1f}x" if row.speedup else f"{'':8s}"
        if "speedup_over_ancestral" in row.extra:
            speedup += f" ({row.extra['speedup_over_ancestral']:.1f}x over {ANCESTRAL})"
        lines.append(f"{row.implementation:16s} {row.sampling_steps:6d} "
                     f"{row.extra['seconds_per_image']:9.2f} {speedup}  {row.note}")
    return "\n".join(lines)
