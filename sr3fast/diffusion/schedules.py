"""Noise schedules for SR3: beta tables, the noise-level tables derived from them, respacing.

Notation (Saharia et al. 2021, sec. 2; Ho et al. 2020): for steps t = 1..T,

    a_t = 1 - b_t,    g_t = prod_{i<=t} a_i  (the paper's gamma),    g_0 = 1,
    q(y_t | y_0) = N(sqrt(g_t) y_0, (1 - g_t) I).

Every table here is float64 on the CPU: the samplers and the training loss convert what they
need and copy it to the data device once (see `NoiseSchedule.gamma_table`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import torch

SCHEDULES = ("linear", "quad", "warmup10", "warmup50", "const", "jsd", "cosine", "lambda")
BetasLike = Union[str, Sequence[float], torch.Tensor]

# The public SR3 code samples with log(max(posterior variance, 1e-20)): the variance is 0 at t = 1.
POSTERIOR_VARIANCE_FLOOR = 1e-20
# Largest beta of the cosine schedule (Nichol & Dhariwal 2021): its last betas would approach 1.
COSINE_MAX_BETA = 0.999


def _linspace(start: float, end: float, steps: int) -> torch.Tensor:
    return torch.linspace(start, end, steps, dtype=torch.float64)


def _warmup(linear_start: float, linear_end: float, n_timestep: int, fraction: float) -> torch.Tensor:
    """linear_end everywhere except a linear ramp from linear_start over the first fraction·T steps."""
    betas = torch.full((n_timestep,), float(linear_end), dtype=torch.float64)
    warmup_steps = int(n_timestep * fraction)
    betas[:warmup_steps] = _linspace(linear_start, linear_end, warmup_steps)
    return betas


def _cosine(n_timestep: int, s: float) -> torch.Tensor:
    """Nichol & Dhariwal (2021) eq. 17: g(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2),
    b_t = 1 - g(t)/g(t-1), clamped to COSINE_MAX_BETA."""
    f = torch.cos((torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + s)
                  / (1 + s) * math.pi / 2) ** 2
    g = f / f[0]
    return (1 - g[1:] / g[:-1]).clamp(max=COSINE_MAX_BETA)


def lambda_levels(steps: int, lambda_start: float, lambda_end: float, rho: float = 1.0) -> torch.Tensor:
    """The (steps,) float64 noise levels g_1..g_T whose half log-SNRs lambda = 0.5·log(g/(1 - g))
    run from lambda_end (step 1, the least noisy) to lambda_start (step T, where sampling starts):

        lambda at loop step i (i = 0 .. T-1, u = i/(T-1)) = lambda_start + (lambda_end - lambda_start)·u^rho

    rho = 1 spaces the steps evenly in lambda (the spacing DPM-Solver's analysis assumes);
    rho > 1 takes small steps at high noise and large ones near the end; rho < 1 the opposite.
    One step: the single level lambda_start."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"lambda schedule: steps must be a positive integer, got {steps!r}")
    if not (math.isfinite(lambda_start) and math.isfinite(lambda_end) and lambda_start < lambda_end):
        raise ValueError(f"lambda schedule: need finite lambda_start < lambda_end (sampling goes from "
                         f"noisy to clean), got {lambda_start!r}, {lambda_end!r}")
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"lambda schedule: rho must be positive, got {rho!r}")
    u = _linspace(0, 1, steps) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    lam = lambda_start + (lambda_end - lambda_start) * u ** rho      # loop order: noisy first
    return torch.sigmoid(2 * lam).flip(0)                            # g_1 .. g_T


def _betas_of_levels(gammas: torch.Tensor) -> torch.Tensor:
    return 1 - gammas / torch.cat([gammas.new_ones(1), gammas[:-1]])


def _named_betas(name: str, n: int, start: float, end: float, cosine_s: float,
                 lambda_start: float | None = None, lambda_end: float | None = None,
                 rho: float = 1.0) -> torch.Tensor:
    if name == "lambda":
        if lambda_start is None or lambda_end is None:
            raise ValueError("schedule 'lambda' needs lambda_start and lambda_end (the half "
                             "log-SNRs of its noisiest and its cleanest level)")
        return _betas_of_levels(lambda_levels(n, lambda_start, lambda_end, rho))
    if name == "linear":
        return _linspace(start, end, n)
    if name == "quad":
        return _linspace(start ** 0.5, end ** 0.5, n) ** 2
    if name == "warmup10":
        return _warmup(start, end, n, 0.1)
    if name == "warmup50":
        return _warmup(start, end, n, 0.5)
    if name == "const":
        return torch.full((n,), float(end), dtype=torch.float64)
    if name == "jsd":  # 1/T, 1/(T-1), ..., 1: ends at beta = 1, so g_T = 0
        return 1.0 / torch.arange(n, 0, -1, dtype=torch.float64)
    if name == "cosine":
        return _cosine(n, cosine_s)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)} "
                     "or pass the betas themselves as a list or tensor")


def _checked_betas(betas: torch.Tensor, what: str) -> torch.Tensor:
    """betas as a fresh 1-D float64 CPU tensor, or a ValueError saying what is wrong with them."""
    if betas.dim() != 1 or betas.numel() == 0:
        raise ValueError(f"{what}: betas must be a non-empty 1-D sequence (one per step), "
                         f"got shape {tuple(betas.shape)}")
    bad = ~(torch.isfinite(betas) & (betas > 0) & (betas <= 1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{what}: every beta must lie in (0, 1] (0 leaves the noise level "
                         f"unchanged; above 1 is no variance), but beta[{i}] = {betas[i].item()!r}")
    if (1 - betas[0]).item() == 1:
        raise ValueError(f"{what}: beta[0] = {betas[0].item()!r} is below float64 resolution, "
                         "so g_1 = 1 and the step adds no noise; use betas of at least 1e-15")
    return betas.detach().to("cpu", torch.float64).clone()


def make_betas(schedule: BetasLike, n_timestep: int | None = None, linear_start: float = 1e-4,
               linear_end: float = 2e-2, cosine_s: float = 8e-3, *, lambda_start: float | None = None,
               lambda_end: float | None = None, rho: float = 1.0) -> torch.Tensor:
    """The (T,) float64 beta table of a named schedule, as defined by the public SR3 code's
    `make_beta_schedule`, or the given betas checked.

    schedule: one of SCHEDULES, or the betas themselves (list or tensor; n_timestep, if given,
    must then equal their count). "linear" and "quad" run from linear_start to linear_end;
    "warmup10"/"warmup50" ramp linearly over the first 10%/50% of steps, then hold linear_end;
    "const" is linear_end throughout; "jsd" is 1/T, 1/(T-1), ..., 1; "cosine" ignores
    linear_start/linear_end and uses cosine_s. "lambda" (an inference schedule, sr3fast's own)
    places the levels by half log-SNR from lambda_start to lambda_end with spacing rho
    (`lambda_levels`); `sr3fast tune-schedule` searches its lambda_end and rho.
    """
    if isinstance(schedule, str):
        if isinstance(n_timestep, bool) or not isinstance(n_timestep, int) or n_timestep < 1:
            raise ValueError(f"make_betas({schedule!r}): n_timestep must be a positive integer "
                             f"(the number of diffusion steps T), got {n_timestep!r}")
        betas = _named_betas(schedule, n_timestep, linear_start, linear_end, cosine_s,
                             lambda_start, lambda_end, rho)
        what = (f"schedule {schedule!r} with n_timestep={n_timestep}, linear_start={linear_start}, "
                f"linear_end={linear_end}")
        return _checked_betas(betas, what)
    try:
        betas = torch.as_tensor(schedule, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError("make_betas: schedule must be a schedule name "
                         f"({', '.join(SCHEDULES)}) or a sequence of betas; got {schedule!r}") from err
    betas = _checked_betas(betas, "make_betas")
    if n_timestep is not None and n_timestep != betas.numel():
        raise ValueError(f"make_betas: n_timestep={n_timestep} but {betas.numel()} betas were given; "
                         "leave n_timestep out when passing betas")
    return betas


_CONFIG_KEYS = ("schedule", "n_timestep", "linear_start", "linear_end", "cosine_s", "lambda_start",
                "lambda_end", "rho")


@dataclass(frozen=True, eq=False, repr=False)
class NoiseSchedule:
    """A T-step variance schedule and every per-step table derived from it (float64, CPU).

    Index j of each (T,) table is step t = j + 1.

        betas, alphas           b_t, a_t = 1 - b_t
        gammas, gammas_prev     g_t = prod_{i<=t} a_i, and g_{t-1} (g_0 = 1)
        posterior_variance      (1 - g_{t-1}) b_t / (1 - g_t), the variance of q(y_{t-1} | y_t, y_0)
        posterior_log_variance  log(max(posterior_variance, 1e-20)), as the public code clips it
        posterior_mean_coef_x0  sqrt(g_{t-1}) b_t / (1 - g_t)      the posterior mean is
        posterior_mean_coef_yt  sqrt(a_t) (1 - g_{t-1}) / (1 - g_t)  coef_x0·y_0 + coef_yt·y_t

    A schedule ending at beta = 1 ("jsd") has g_T = 0: its tables are finite, and training on it
    works, but no sampler can start there (see sr3fast.diffusion.coefficients).
    """

    betas: torch.Tensor
    alphas: torch.Tensor = field(init=False)
    gammas: torch.Tensor = field(init=False)
    gammas_prev: torch.Tensor = field(init=False)
    posterior_variance: torch.Tensor = field(init=False)
    posterior_log_variance: torch.Tensor = field(init=False)
    posterior_mean_coef_x0: torch.Tensor = field(init=False)
    posterior_mean_coef_yt: torch.Tensor = field(init=False)
    # device -> [g_0 = 1, g_1, ..., g_T] on that device; filled by gamma_table
    _device_tables: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        betas = self.betas if isinstance(self.betas, torch.Tensor) else torch.as_tensor(
            self.betas, dtype=torch.float64)
        betas = _checked_betas(betas.to(torch.float64), "NoiseSchedule")
        alphas = 1 - betas
        gammas = torch.cumprod(alphas, dim=0)
        gammas_prev = torch.cat([gammas.new_ones(1), gammas[:-1]])
        one_minus_gammas = 1 - gammas  # > 0: betas[0] > 0 is checked above
        variance = betas * (1 - gammas_prev) / one_minus_gammas
        tables = {
            "betas": betas,
            "alphas": alphas,
            "gammas": gammas,
            "gammas_prev": gammas_prev,
            "posterior_variance": variance,
            "posterior_log_variance": variance.clamp(min=POSTERIOR_VARIANCE_FLOOR).log(),
            "posterior_mean_coef_x0": betas * gammas_prev.sqrt() / one_minus_gammas,
            "posterior_mean_coef_yt": alphas.sqrt() * (1 - gammas_prev) / one_minus_gammas,
        }
        for name, table in tables.items():
            object.__setattr__(self, name, table)

    @classmethod
    def from_config(cls, config: Mapping) -> "NoiseSchedule":
        """From a schedule dict as in the public SR3 JSON configs and `model.config.schedule`:
        {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 1e-2}
        ("cosine_s" optional), or sr3fast's inference schedule
        {"schedule": "lambda", "n_timestep": 20, "lambda_start": 0.0, "lambda_end": 6.0, "rho": 1.0}."""
        if not isinstance(config, Mapping):
            raise TypeError(f"NoiseSchedule.from_config expects a dict, got {type(config).__name__}")
        if "schedule" not in config:
            hint = (" It looks like the public config's beta_schedule block: pass its 'train' or "
                    "'val' entry." if {"train", "val"} & set(config) else "")
            raise ValueError(f"schedule config {dict(config)!r} has no 'schedule' key.{hint}")
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"schedule config has unknown keys {unknown}; "
                             f"known keys: {', '.join(_CONFIG_KEYS)}")
        options = {key: config[key] for key in _CONFIG_KEYS[2:] if key in config}
        return cls(make_betas(config["schedule"], config.get("n_timestep"), **options))

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_steps

    def gamma_table(self, device: torch.device | str) -> torch.Tensor:
        """[g_0 = 1, g_1, ..., g_T] on `device`, float64 (float32 where the device has no
        float64), copied there once and reused by every later call."""
        device = torch.device(device)
        table = self._device_tables.get(device)
        if table is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            table = torch.cat([self.gammas.new_ones(1), self.gammas]).to(device, dtype)
            self._device_tables[device] = table
        return table

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_steps}, beta_1={self.betas[0].item():.3g}, "
                f"beta_T={self.betas[-1].item():.3g}, g_T={self.gammas[-1].item():.3g})")


def respace(schedule: NoiseSchedule, steps: int) -> NoiseSchedule:
    """A `steps`-step schedule whose noise levels are `steps` evenly spaced entries of
    schedule.gammas, always including the last (g_T) and, for steps >= 2, the first (g_1).

    Betas are re-derived from the kept levels, b_i = 1 - g_i / g_{i-1} (g_0 = 1), so every
    table of the new schedule is consistent. This is valid for SR3 without retraining because
    the network is conditioned on the noise level g itself, not on a step index: the paper
    picks its inference schedules by search for the same reason.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"respace expects a NoiseSchedule, got {type(schedule).__name__}")
    total = schedule.num_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise ValueError(f"respace: steps must be an integer from 1 to {total} (the schedule's "
                         f"number of steps), got {steps!r}")
    if steps == total:
        return schedule
    # Counting down from the last index keeps it when steps == 1; spacing >= 1 keeps them distinct.
    index = _linspace(total - 1, 0, steps).round().long().flip(0)
    gammas = schedule.gammas[index]
    gammas_prev = torch.cat([gammas.new_ones(1), gammas[:-1]])
    return NoiseSchedule(1 - gammas / gammas_prev)


def respace_log_snr(schedule: NoiseSchedule, steps: int, start_gamma: float | None = None) -> NoiseSchedule:
    """A `steps`-step schedule spanning the same levels as `schedule` (from start_gamma when
    given, else its noisiest level g_T, to its cleanest g_1), spaced evenly in half log-SNR
    lambda = 0.5·log(g/(1 - g)) instead of in the training step index: a "lambda" schedule
    (lambda_levels, rho = 1). This is the spacing DPM-Solver's analysis assumes; respacing a
    linear training schedule by index instead makes the last lambda steps many times longer than
    the ones before, which a multistep correction extrapolates across (see the README's
    validation)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"respace_log_snr expects a NoiseSchedule, got {type(schedule).__name__}")
    g_start = float(start_gamma) if start_gamma else schedule.gammas[-1].item()
    g_end = schedule.gammas[0].item()
    if not 0 < g_start < g_end:
        raise ValueError(f"respace_log_snr: the start level {g_start!r} must lie in (0, {g_end!r}), "
                         "below the schedule's cleanest level")
    half_log_snr = lambda g: 0.5 * math.log(g / (1 - g))  # noqa: E731
    return NoiseSchedule.from_config({"schedule": "lambda", "n_timestep": steps,
                                      "lambda_start": half_log_snr(g_start),
                                      "lambda_end": half_log_snr(g_end), "rho": 1.0})


def truncate(schedule: NoiseSchedule, min_gamma: float) -> NoiseSchedule:
    """The first steps of `schedule`, up to the last whose noise level g_t is still >= min_gamma
    (at least one step): a reverse chain over it starts at g_T ~ min_gamma instead of pure
    noise. With y_T drawn from the condition noised to that level, that is SDEdit (Meng et al.
    2022) or "come closer, diffuse faster" (Chung et al. 2022): the low frequencies come from
    the condition, the network only has to restore the detail, in fewer steps."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"truncate expects a NoiseSchedule, got {type(schedule).__name__}")
    if not 0 < min_gamma < 1:
        raise ValueError(f"truncate: min_gamma must lie in (0, 1), got {min_gamma!r}")
    kept = max(1, int((schedule.gammas >= min_gamma).sum()))
    return NoiseSchedule(schedule.betas[:kept].clone())
