"""Cascades: super-resolution in stages, each stage's output the next one's input.

(The module is `cascades`, not `cascade`: importing a submodule binds its name on the package,
which would hide the public function sr3fast.cascade.)

SR3 reaches high factors by chaining models (Saharia et al. 2021, section 4: 64->256->1024,
with fewer sampling steps at the higher resolutions): each stage is an ordinary sampling call
with its own model, steps and sampler, so a cascade is usable wherever a model is passed to
sr3fast.upscale:

    pipeline = sr3fast.cascade(["64-256.safetensors", "256-1024.safetensors"],
                               steps=[100, 50], sampler=["posterior", "ddim"])
    image = sr3fast.upscale(photo, model=pipeline, seed=0)          # 16x
    image = sr3fast.upscale(photo, scale=16, seed=0)                # the default 4x model, twice

Between stages the image stays a float tensor in [0, 1] (clamped: samplers without x0-clipping
may step slightly outside), never rounded to 8 bits. Stage i samples with its own seed, drawn
from the call's seed (same seed, same image; the stages' noise independent of each other).
Settings a stage leaves as None come from the upscale call, then from the stage model's
recommended settings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .images import from_unit_batch, to_unit_batch

# what a stage may set for itself; everything else (tile, loop, noise, ...) is the call's
STAGE_SETTINGS = ("steps", "sampler", "start_gamma", "back_projections", "eta")


@dataclass(frozen=True)
class Stage:
    """One sampling call of a cascade: its model (an SR3 or another model upscale accepts) and
    the settings it overrides (None: the call's, else the model's recommended)."""
    model: object
    steps: int | None = None
    sampler: str | None = None
    start_gamma: float | None = None
    back_projections: int | None = None
    eta: float | None = None

    @property
    def factor(self) -> int:
        return _factor(self.model)


def _factor(model) -> int:
    config = model.config
    if config.high_res % config.low_res:
        raise ValueError(f"a cascade stage must upscale by a whole factor; this model maps "
                         f"{config.low_res} -> {config.high_res}")
    return config.high_res // config.low_res


class Cascade:
    """Stages run in order by upscale (sr3fast.cascade builds one). `factor` is the product of
    the stages' factors."""

    def __init__(self, stages: list[Stage]):
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        self.stages = list(stages)

    @property
    def factor(self) -> int:
        result = 1
        for stage in self.stages:
            result *= stage.factor
        return result

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        return "Cascade(" + ", ".join(f"{stage.factor}x" for stage in self.stages) + ")"

    def stage_seeds(self, seed: int | None) -> list[int]:
        """One seed per stage, drawn from `seed` (from torch's global RNG when None)."""
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        return [int(s) for s in torch.randint(2**62, (len(self.stages),), generator=generator)]

    @torch.no_grad()
    def upscale(self, x, *, scale: int | None = None, seed: int | None = None, progress: bool = True,
                **settings):
        """x upscaled by every stage in turn (see sr3fast.upscale for x, settings and the result's
        kind). scale, when given, must be the cascade's factor. A setting in STAGE_SETTINGS that
        a stage fixes overrides the call's."""
        from .api import upscale

        if scale is not None and scale != self.factor:
            raise ValueError(f"scale={scale}, but this cascade upscales {self.factor}x "
                             f"({' then '.join(f'{s.factor}x' for s in self.stages)}); drop scale= "
                             "or change the stages")
        if settings.get("package") is not None:
            raise ValueError("a package from `sr3fast export` is one model at one size; a cascade runs "
                             "its stages' models: drop package=")
        images, kind = to_unit_batch(x)
        for stage, stage_seed in zip(self.stages, self.stage_seeds(seed)):
            own = {name: getattr(stage, name) for name in STAGE_SETTINGS if getattr(stage, name) is not None}
            if "sampler" in own and "eta" not in own and own["sampler"] != "ddim":
                own["eta"] = None          # the call's eta is DDIM's; it does not follow to another sampler
            images = upscale(images, model=stage.model, seed=stage_seed, progress=progress,
                             **{**settings, **own}).clamp_(0, 1)
        return from_unit_batch(images, kind)


def _per_stage(name: str, value, count: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name}= gives {len(value)} values for {count} stages; give one per stage "
                             "(None: the model's recommended) or a single value for all")
        return list(value)
    return [value] * count


def cascade(models, steps=None, sampler=None, start_gamma=None, back_projections=None,
            eta=None) -> Cascade:
    """A cascade of `models` (SR3s, or anything sr3fast.load accepts: presets, checkpoint paths,
    "default"), run in order by sr3fast.upscale(x, model=cascade(...)). steps, sampler,
    start_gamma, back_projections, eta: one value per stage (a list) or one for all; None leaves
    a stage to the call's setting, else its model's recommended."""
    from .api import load

    if isinstance(models, (str, bytes)) or not hasattr(models, "__iter__"):
        raise TypeError("cascade takes a list of models, e.g. sr3fast.cascade(['default', 'default'])")
    models = [model if hasattr(model, "predict_noise") else load(model) for model in models]
    if not models:
        raise ValueError("a cascade needs at least one model")
    columns = {name: _per_stage(name, value, len(models)) for name, value in
               (("steps", steps), ("sampler", sampler), ("start_gamma", start_gamma),
                ("back_projections", back_projections), ("eta", eta))}
    return Cascade([Stage(model, **{name: column[i] for name, column in columns.items()})
                    for i, model in enumerate(models)])


def repeated(model, scale: int) -> Cascade:
    """`model` (factor f) run k times for scale = f**k, k >= 1: upscale(x, scale=16) with a 4x model."""
    factor = _factor(model)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
        raise ValueError(f"scale must be an integer factor of at least 2, got {scale!r}")
    stages, total = 1, factor
    while total < scale and factor > 1:
        total *= factor
        stages += 1
    if total != scale:
        powers = ", ".join(str(factor ** k) for k in range(1, 4))
        raise ValueError(f"scale={scale} is not a power of this model's factor {factor} ({powers}, ...); "
                         "pass sr3fast.cascade([...]) with models whose factors multiply to it")
    return Cascade([Stage(model)] * stages)
