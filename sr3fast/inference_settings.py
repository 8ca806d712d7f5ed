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
    steps is `steps`, or None: the model's training schedule respaced to `steps`.
    start_gamma: start from the condition noised to this level g instead of from pure noise (the
    training schedule truncated there, sr3fast.diffusion.truncate; see sr3fast.upscale); None
    or 0: from pure noise.
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
            raise ValueError("give an inference schedule or start_gamma, not both (start_gamma "
                             "truncates the training schedule)")

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


def check_start_gamma(start_gamma) -> None:
    if start_gamma is not None and (isinstance(start_gamma, bool) or not isinstance(start_gamma, (int, float))
                                    or not 0 <= start_gamma < 1):
        raise ValueError(f"start_gamma must lie in [0, 1) (the noise level sampling starts from; 0: pure "
                         f"noise), got {start_gamma!r}")
