"""A model's recommended sampling settings, carried in its checkpoint's metadata.

SR3 conditions on the noise level, so how a model is best sampled (sampler, number of steps,
inference noise schedule) is a choice made after training, by evaluation on held-out images.
The checkpoint records that choice; `sr3fast.upscale` uses it whenever the caller does not say
otherwise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

METADATA_KEY = "inference"


@dataclass(frozen=True)
class InferenceSettings:
    """sampler: a name of sr3fast.diffusion.SAMPLERS, or None (by architecture).
    steps: sampling steps, or None (upscale's default).
    schedule: an inference noise-schedule dict (NoiseSchedule.from_config form) whose number of
    steps is `steps`, or None: the model's training schedule respaced to `steps`. A "lambda"
    schedule (what `sr3fast tune-schedule` writes) serves any step count: its n_timestep is
    replaced (`schedule_for_steps`).
    start_gamma: start from the condition noised to this level g instead of from pure noise (the
    training schedule truncated there, sr3fast.diffusion.truncate; see sr3fast.upscale); None
    or 0: from pure noise. With a schedule, it must be the schedule's first level g_T.
    back_projections: back-projection steps toward the input after sampling (sr3fast.projection);
    0: none."""
    sampler: str | None = None
    steps: int | None = None
    schedule: dict | None = None
    start_gamma: float | None = None
    back_projections: int = 0

    def __post_init__(self):
        from .diffusion import SAMPLERS, NoiseSchedule

        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"recommended sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"recommended steps must be a positive integer, got {self.steps!r}")
        if self.schedule is not None:
            steps = NoiseSchedule.from_config(self.schedule).num_steps
            if self.steps is not None and steps != self.steps:
                raise ValueError(f"the recommended schedule has {steps} steps but steps={self.steps}")
            object.__setattr__(self, "steps", steps)
        check_start_gamma(self.start_gamma)
        if isinstance(self.back_projections, bool) or not isinstance(self.back_projections, int) \
                or self.back_projections < 0:
            raise ValueError(f"back_projections must be an integer >= 0, got {self.back_projections!r}")
        if self.start_gamma and self.schedule is not None:
            check_schedule_start(self.schedule, self.start_gamma)

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps({"sampler": self.sampler, "steps": self.steps,
                                          "schedule": self.schedule, "start_gamma": self.start_gamma,
                                          "back_projections": self.back_projections})}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "InferenceSettings | None":
        """The settings a checkpoint's metadata records, or None when it records none."""
        if METADATA_KEY not in metadata:
            return None
        data = json.loads(metadata[METADATA_KEY])
        return cls(sampler=data.get("sampler"), steps=data.get("steps"), schedule=data.get("schedule"),
                   start_gamma=data.get("start_gamma"), back_projections=data.get("back_projections", 0))


def schedule_for_steps(schedule: dict | None, steps: int) -> dict | None:
    """`schedule` with `steps` steps: a "lambda" schedule keeps its endpoints and spacing at any
    step count; any other (a fixed table of levels) only serves its own, so None for other counts
    (the caller then respaces the training schedule)."""
    if schedule is None:
        return None
    if schedule.get("schedule") == "lambda":
        return {**schedule, "n_timestep": steps}
    return schedule if schedule.get("n_timestep") == steps else None


def check_schedule_start(schedule, start_gamma: float) -> None:
    """Sampling from the input noised to start_gamma over `schedule` (a NoiseSchedule or its
    dict) needs the schedule to start there: its first level g_T must be start_gamma."""
    from .diffusion import NoiseSchedule

    if isinstance(schedule, dict):
        schedule = NoiseSchedule.from_config(schedule)
    g_T = schedule.gammas[-1].item()
    if abs(g_T - start_gamma) > 1e-6 * max(start_gamma, 1e-12):
        raise ValueError(f"start_gamma={start_gamma!r} but the schedule's first level is g_T={g_T!r}: "
                         "sampling from the noised input starts at the schedule's first level, so "
                         "they must agree (drop start_gamma, or pass a schedule that starts there)")


def check_start_gamma(start_gamma) -> None:
    if start_gamma is not None and (isinstance(start_gamma, bool) or not isinstance(start_gamma, (int, float))
                                    or not 0 <= start_gamma < 1):
        raise ValueError(f"start_gamma must lie in [0, 1) (the noise level sampling starts from; 0: pure "
                         f"noise), got {start_gamma!r}")
