"""Checkpoints and configs of the widely used public SR3 PyTorch implementation
(Janspiry/Image-Super-Resolution-via-Iterative-Refinement).

Its generator checkpoint `I{iter}_E{epoch}_gen.pth` is the state_dict of a `GaussianDiffusion`
module: the U-Net's weights under `denoise_fn.` plus 12 schedule buffers computed from the
config. Its config is JSON with `//` comments; the U-Net is described by `model.unet`, the image
size by `model.diffusion.image_size`, and the noise schedule by `model.beta_schedule`.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..checkpoint import CheckpointError

WEIGHTS_PREFIX = "denoise_fn."
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
})


def strip_json_comments(text: str) -> str:
    """Remove // line comments and /* */ block comments outside JSON strings."""
    out, i, in_string = [], 0, False
    while i < len(text):
        char = text[i]
        if in_string:
            out.append(char)
            if char == "\\":
                out.append(text[i + 1:i + 2])
                i += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            out.append(char)
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = len(text) if end < 0 else end + 2
            continue
        else:
            out.append(char)
        i += 1
    return "".join(out)


def read_config(source: str | os.PathLike | dict) -> dict:
    """The public implementation's JSON config (a path, or an already parsed dict)."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist")
    try:
        return json.loads(strip_json_comments(path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"config {str(path)!r} is not valid JSON (after removing // comments): {err}") from None


def sr3_config_from_public(source: str | os.PathLike | dict):
    """An sr3fast SR3Config from the public implementation's JSON config."""
    from ..model import SR3Config, UNetConfig

    config = read_config(source)
    try:
        model = config["model"]
        unet, diffusion = model["unet"], model["diffusion"]
        image_size = int(diffusion["image_size"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"this does not look like a config of the public SR3 code: no {err} in it "
                         "(expected model.unet, model.diffusion.image_size, model.beta_schedule)") from None
    which = model.get("which_model_G", "sr3")
    if which != "sr3":
        raise ValueError(f"config has which_model_G={which!r}; sr3fast runs the 'sr3' network of the "
                         "public code (its 'ddpm' network has a different structure)")
    if not diffusion.get("conditional", True):
        raise ValueError("config describes an unconditional model (diffusion.conditional=false); "
                         "sr3fast runs conditional super-resolution models")
    schedules = model.get("beta_schedule", {})
    schedule = schedules.get("train") or schedules.get("val")
    if schedule is None:
        raise ValueError("config has no model.beta_schedule.train (or .val) section")
    datasets = config.get("datasets", {})
    data = datasets.get("val") or datasets.get("train") or {}
    high_res = int(data.get("r_resolution", image_size))
    low_res = int(data.get("l_resolution", high_res))
    return SR3Config(
        unet=UNetConfig.from_public_json(unet, image_size),
        schedule={key: schedule[key] for key in SCHEDULE_KEYS if key in schedule},
        low_res=low_res, high_res=high_res,
        description=f"public SR3 checkpoint config {config.get('name', '')!r}".strip(),
    )


SCHEDULE_KEYS = ("schedule", "n_timestep", "linear_start", "linear_end")


class ScheduleMismatchWarning(UserWarning):
    """A public checkpoint's stored `betas` are not the noise schedule of the config given with it."""


def read_public_model(path: str | os.PathLike, config):
    """(SR3Config, sr3fast state_dict) of a public `*_gen.pth` and the JSON config it was trained
    with (a path, a parsed dict, or an SR3Config), its stored noise schedule checked against the
    config's (`check_stored_schedule`). What sr3fast.load does with a public checkpoint."""
    from ..model import SR3Config

    public = None if isinstance(config, SR3Config) else read_config(config)
    sr3_config = config if public is None else sr3_config_from_public(public)
    state = read_public_checkpoint(path)
    if public is not None:
        schedules = dict(public["model"].get("beta_schedule", {}))
    else:
        schedules = {"sr3fast config": sr3_config.schedule}
    check_stored_schedule(state, schedules, used=sr3_config.schedule, source=str(path))
    return sr3_config, to_sr3fast_state(state)


def check_stored_schedule(state: dict[str, torch.Tensor], schedules: dict[str, dict], used: dict,
                          source: str) -> bool:
    """Warn (ScheduleMismatchWarning) when the checkpoint's stored `betas` buffer is none of the
    config's beta schedules (`schedules`: phase -> schedule dict, e.g. the public config's
    model.beta_schedule {"train": ..., "val": ...}); True when they agree or nothing is stored.

    The schedule that counts is the config's (`used`), not the stored buffers: SR3's network is
    conditioned on the noise level itself, so the buffers are only tables derived from a
    schedule, and the public code recomputes them from its config whenever it sets a schedule
    (set_new_noise_schedule) rather than trusting the stored ones; sr3fast likewise derives its
    training and inference noise levels from the config. Buffers that match no phase of the
    config mean the config is probably not the one the checkpoint was trained with: the warning
    says so, with both schedules, so that the user can pass the right config."""
    from ..diffusion import NoiseSchedule

    stored = state.get("betas")
    if stored is None:
        return True
    stored = stored.detach().double().reshape(-1).cpu()
    for schedule in schedules.values():
        try:
            betas = NoiseSchedule.from_config({key: value for key, value in schedule.items()
                                               if key in SCHEDULE_KEYS}).betas
        except (KeyError, TypeError, ValueError):
            continue
        # the public code computes them in float64 and stores float32: equal to float32 rounding
        if betas.shape == stored.shape and torch.allclose(stored, betas, rtol=1e-6, atol=0):
            return True
    described = "; ".join(f"{phase}: {_describe_schedule(s)}" for phase, s in schedules.items())
    warnings.warn(
        f"{source!r}: the checkpoint's stored noise schedule (betas: {stored.numel()} steps, "
        f"{stored[0].item():.4g} .. {stored[-1].item():.4g}) is none of its config's ({described}). "
        f"sr3fast uses the config's ({_describe_schedule(used)}): the network is conditioned on "
        "the noise level, the stored betas are only tables derived from a schedule, and the public "
        "code itself recomputes them from its config. If the checkpoint was trained with another "
        "schedule, pass the JSON config it was trained with; its noise levels then follow.",
        ScheduleMismatchWarning, stacklevel=3)
    return False


def _describe_schedule(schedule) -> str:
    if not isinstance(schedule, dict):
        return repr(schedule)
    return (f"{schedule.get('schedule', '?')}, {schedule.get('n_timestep', '?')} steps, "
            f"{schedule.get('linear_start', '?')} .. {schedule.get('linear_end', '?')}")


def read_public_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a `*_gen.pth`, read with weights_only=True (a checkpoint never runs code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for damaged or foreign files
        raise CheckpointError(f"cannot read {str(path)!r} as a PyTorch checkpoint: it is truncated, "
                              f"corrupt, or holds more than tensors ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not a state_dict")
    if {"optimizer", "iter"} & set(state) and not any(str(k).startswith(WEIGHTS_PREFIX) for k in state):
        raise CheckpointError(f"{str(path)!r} is the public code's optimizer state (*_opt.pth); "
                              "pass the matching *_gen.pth")
    if state and all(key.startswith("module.") for key in state):
        # saved from an nn.DataParallel wrapper
        state = {key[len("module."):]: value for key, value in state.items()}
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{str(path)!r} is not a weights file: entries {bad[:5]} are not tensors")
    return state


def to_sr3fast_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a public state_dict onto sr3fast's SR3 keys: `denoise_fn.X` -> `unet.X`; the 12 schedule
    buffers are dropped (sr3fast recomputes them from the config). Other keys are kept as they are,
    so that the strict check reports them."""
    mapped = {}
    for key, value in state.items():
        if key.startswith(WEIGHTS_PREFIX):
            mapped["unet." + key[len(WEIGHTS_PREFIX):]] = value
        elif key not in SCHEDULE_BUFFERS:
            mapped[key] = value
    return mapped


def to_public_state(state: dict[str, torch.Tensor], schedule_buffers: dict[str, torch.Tensor] | None = None):
    """The inverse mapping: sr3fast SR3 keys `unet.X` -> `denoise_fn.X` (plus schedule buffers)."""
    mapped = {WEIGHTS_PREFIX + key[len("unet."):]: value for key, value in state.items()
              if key.startswith("unet.")}
    mapped.update(schedule_buffers or {})
    return mapped
