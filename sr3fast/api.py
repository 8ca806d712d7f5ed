"""The public entry points: load a model, save it, upscale images."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, check_state_dict, read_checkpoint, save_checkpoint
from .images import from_unit_batch, to_unit_batch
from .inference_settings import (InferenceSettings, check_schedule_start, check_start_gamma,
                                 schedule_for_steps)
from .projection import back_project

# The default model: trained by scripts/train_default.sh, shipped inside the package
# (docs/model-card.md). Its SHA-256 is recorded beside it.
DEFAULT_MODEL = "default"
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "default-4x.safetensors"


def load(source, config=None, device=None, dtype=None, *, seed: int | None = None):
    """An `SR3` model, in eval mode, from

    - "default": the trained 4x model shipped inside the package (no network; see
      docs/model-card.md), in float32 unless dtype= says otherwise;
    - a preset name (`sr3fast.presets()`): the architecture with freshly initialised weights,
      drawn from `seed` when given (same seed, same weights), else from torch's global RNG;
    - an sr3fast checkpoint (`.safetensors`, the config is inside), or a folder holding one as
      model.safetensors (what `sr3fast train` writes into its --out folder);
    - a checkpoint of the public SR3 code (`*_gen.pth`) with its JSON config as `config=`
      (a path or the parsed dict; `//` comments are fine).

    device, dtype: where and in which precision to put the weights. seed: used by presets only.
    Mismatched weights raise CheckpointError listing missing, unexpected and mis-shaped keys.
    """
    from .model import SR3, presets

    if isinstance(source, SR3):
        model = source
    elif isinstance(source, str) and source == DEFAULT_MODEL:
        if config is not None:
            raise ValueError("config= is for public checkpoints; 'default' is sr3fast's own model")
        model = _load_default()
        dtype = torch.float32 if dtype is None else dtype   # stored in float16 to keep it small
    elif isinstance(source, str) and source in presets():
        if config is not None:
            raise ValueError(f"config= is for public checkpoints; {source!r} is a preset name")
        model = _build_seeded(source, seed)
    else:
        path = Path(source)
        if path.is_dir():
            path = _checkpoint_in_folder(path)
        if not path.exists():
            known = ", ".join(sorted(presets()))
            raise FileNotFoundError(f"{str(source)!r} is neither an existing file nor a preset name "
                                    f"(presets: {known})")
        model = _load_public(path, config) if not _is_safetensors(path) else _load_sr3fast(path, config)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def save(model, path: str | os.PathLike, dtype=None) -> Path:
    """Write `model` as an sr3fast checkpoint (safetensors + config, and its recommended
    inference settings when it has them), atomically. dtype: store the floating-point weights in
    this precision (e.g. torch.float16 to halve the file), default as they are."""
    state = model.state_dict()
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    settings = getattr(model, "inference_settings", None)
    return save_checkpoint(path, state, model.config.to_dict(),
                           metadata=settings.to_metadata() if settings is not None else None)


def _build_seeded(name: str, seed: int | None):
    """Preset `name` with random weights; drawn from `seed` without touching the caller's RNG."""
    from .model import build

    if seed is None:
        return build(name)
    with torch.random.fork_rng(devices=[]):      # the weights are built on the CPU
        torch.default_generator.manual_seed(seed)
        return build(name)


def _checkpoint_in_folder(folder: Path) -> Path:
    """The model.safetensors of a training folder (`sr3fast train --out`, or one of its
    checkpoints/step_N/), or a FileNotFoundError saying what the folder should hold."""
    weights = folder / "model.safetensors"
    if weights.is_file():
        return weights
    steps = sorted((int(p.parent.name[5:]), p) for p in folder.glob("checkpoints/step_*/model.safetensors")
                   if p.parent.name[5:].isdigit())
    hint = (f"; the run has not finished, its newest checkpoint is {str(steps[-1][1])!r}" if steps else
            "; pass the checkpoint file itself, or the --out folder of `sr3fast train` once it has finished")
    raise FileNotFoundError(f"{str(folder)!r} is a folder without model.safetensors (the weights "
                            f"`sr3fast train` writes at the end of a run){hint}")


def _load_default():
    if not DEFAULT_WEIGHTS.is_file():
        raise FileNotFoundError(f"the default model's weights are missing from this installation "
                                f"({DEFAULT_WEIGHTS}); reinstall sr3fast (`pip install sr3fast` ships them)")
    return _load_sr3fast(DEFAULT_WEIGHTS, None)


def _is_safetensors(path: Path) -> bool:
    # A safetensors file starts with an 8-byte header length followed by the JSON header.
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_sr3fast(path: Path, config):
    from .model import SR3Config

    if config is not None:
        raise ValueError(f"{str(path)!r} is an sr3fast checkpoint with its config inside; drop config=")
    config_dict, state, metadata = read_checkpoint(path)
    try:
        sr3_config = SR3Config.from_dict(config_dict)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} holds an invalid sr3fast config: {err}") from None
    weights = {key: value for key, value in state.items() if key.startswith("unet.")}
    model = _instantiate(sr3_config, weights, source=repr(str(path)))
    model.objective = metadata.get("mode", "diffusion")      # written by sr3fast train
    try:
        model.inference_settings = InferenceSettings.from_metadata(metadata)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{str(path)!r} records invalid inference settings: {err}") from None
    return model


def _load_public(path: Path, config):
    from .compat import public_sr3

    if config is None:
        raise ValueError(f"{str(path)!r} is not an sr3fast checkpoint; if it is a *_gen.pth of the public "
                         "SR3 code, pass the JSON config it was trained with: "
                         "sr3fast.load(path, config='config/sr_sr3_16_128.json')")
    sr3_config, state = public_sr3.read_public_model(path, config)   # warns on a schedule mismatch
    hint = ("Pass the JSON config this checkpoint was trained with (unet.inner_channel, "
            "channel_multiplier, res_blocks, attn_res, norm_groups — 32 when absent — and "
            "diffusion.image_size, which places the attention layers).")
    return _instantiate(sr3_config, state, source=repr(str(path)), hint=hint)


def _instantiate(config, state: dict[str, torch.Tensor], source: str, hint: str = ""):
    """Build the architecture without initialising it, check the weights fit, then adopt them."""
    from .model import SR3

    config.unet.validate()
    with torch.device("meta"):
        skeleton = SR3(config)
    expected = {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    check_state_dict(expected, state, source, hint)
    skeleton.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*skeleton.parameters(), *skeleton.buffers())):
        model = SR3(config)                  # a buffer outside the state_dict: build it for real
        model.load_state_dict(state, strict=True)
        return model
    return skeleton


def _default_sampler(model) -> str:
    # Public checkpoints were trained and sampled with x0-clipping and the posterior variance;
    # the paper's Algorithm 2 is the default for the paper architecture.
    return "posterior" if model.config.unet.variant == "public" else "sr3"


@torch.no_grad()
def upscale(x, model=None, *, steps: int | None = None, sampler: str | None = None, seed: int | None = None,
            eta: float | None = None, progress: bool = True, noise: str = "torch", schedule=None,
            loop: str = "python", package=None, start_gamma: float | None = None,
            back_projections: int | None = None, tile=None, tile_overlap: int | None = None,
            max_memory: int | None = None, scale: int | None = None):
    """Super-resolve `x` with SR3 (Algorithm 2 of the paper, or the sampler named).

    x: float tensor (B, 3, h, w) in [0, 1], uint8 tensor, PIL image, or image path. Returns the
    same kind (a PIL image for a path), `high_res // low_res` times larger. The condition is x
    upsampled bicubically to the output size, as in the paper. Sizes the U-Net cannot take are
    padded (reflection) and cropped back.

    model: an SR3 (sr3fast.load) or anything sr3fast.load accepts; None: the default 4x model
    (sr3fast.load("default")). steps: sampling steps, over the model's training noise schedule
    respaced to `steps` g values (SR3 conditions on the noise level, so any schedule works without
    retraining; for the DPM-Solver++ samplers, spaced evenly in log-SNR between the same ends
    instead, sr3fast.diffusion.respace_log_snr), or over `schedule` (a NoiseSchedule or a schedule dict) when given. sampler:
    'posterior' (x0-clipped, posterior variance: how public checkpoints were sampled), 'sr3'
    (Algorithm 2), 'ddim', 'dpmpp_2m' (DPM-Solver++(2M), multistep, for few steps),
    'dpmpp_2m_sde' (its SDE form), 'dpmpp_3m' or 'dpmpp_3m_sde' (the third-order 3M and its SDE form). Whatever is not given comes from the model's recommended settings
    (`model.inference_settings`, stored in its checkpoint; the default model has them), else
    100 steps and the sampler by architecture. seed: same seed, same
    image (noise='torch' draws the noise with torch on the model's device, so every backend gives
    the same image; 'kernel' lets fused backends draw it in-kernel); a preset name as `model` also
    takes its random weights from it. eta: the noise scale of 'ddim' (default 0: deterministic;
    1: the posterior variance), 'dpmpp_2m_sde' and 'dpmpp_3m_sde' (default 1: the SDE); no other
    sampler takes it.

    start_gamma: start the reverse chain at noise level g = start_gamma from the condition
    noised to it, y_T = sqrt(g_T) x + sqrt(1 - g_T) z, over the training schedule truncated there
    (sr3fast.diffusion.truncate; SDEdit, Meng et al. 2022; Chung et al. 2022), instead of from
    pure noise: the low frequencies come from the input, and fewer steps suffice. None: the
    model's recommended (the default model has one), else pure noise; 0: pure noise.
    back_projections: after sampling, this many steps of back-projection toward the input
    (sr3fast.projection: only what the paper's downsampling sees changes, the generated detail
    stays), so the output agrees with its input. None: the model's recommended, else 0 (off).

    loop: where the sampling steps run, 'python', 'cpp' (C++, sr3fast._C) or 'graph' (one CUDA
    graph launch per step); the same seed gives the same image in each (see
    sr3fast.diffusion.loops). package: a path from `sr3fast export`, the U-Net compiled ahead of
    time for this output size and batch, used in place of the model's forward.

    tile: sample on overlapping tiles of this side in output pixels, blending the tiles' noise
    predictions into one canvas every step before ONE reverse step with one noise draw
    (sr3fast.tiling), so memory is bounded and no seam forms; a tile covering the image is
    untiled sampling exactly. None (default): tile only when the image does not fit
    `max_memory`; False: never tile. tile_overlap: pixels neighbouring tiles share (default a
    quarter of the tile). max_memory: bytes sampling may use beyond what is in use when it
    starts (None: what the device can hold, sr3fast.tiling.available_memory); with tile=None it
    picks the tile, with a tile it bounds how many tiles go through the U-Net at once.

    scale: the overall factor; a power of the model's factor runs it as a cascade of that many
    stages (scale=16 with the default 4x model: 4x, then 4x on the result), each stage with its
    own seed. Pass sr3fast.cascade([...]) as model for different models, steps or samplers per
    stage (the paper's 64->256->1024).

    Raises FloatingPointError when the sampled image holds NaN or Inf (non-finite weights, or a
    precision too narrow for the model) rather than return it.
    """
    from .cascades import Cascade, repeated
    from .diffusion import MULTISTEP, NoiseSchedule, respace, respace_log_snr, sample, truncate
    from .tiling import tiler_for

    if model is None:
        model = _default_model()
    elif not hasattr(model, "predict_noise") and not isinstance(model, Cascade):
        model = load(model, seed=seed)
    if scale is not None and not isinstance(model, Cascade):
        model = repeated(model, scale)
    if isinstance(model, Cascade):
        return model.upscale(x, scale=scale, steps=steps, sampler=sampler, seed=seed, eta=eta,
                             progress=progress, noise=noise, schedule=schedule, loop=loop,
                             package=package, start_gamma=start_gamma, back_projections=back_projections,
                             tile=tile, tile_overlap=tile_overlap, max_memory=max_memory)
    if getattr(model, "objective", "diffusion") != "diffusion":
        raise ValueError(f"this model was trained as the paper's {model.objective} baseline: it predicts "
                         "the image in one pass, not noise, so it cannot be sampled. Use "
                         "sr3fast.train.regression.predict(model, condition).")
    sampler, steps, schedule, start_gamma = _settings(model, sampler, steps, schedule, eta, start_gamma)
    back_projections = _back_projections(model, back_projections)
    options = {} if eta is None else {"eta": eta}
    images, kind = to_unit_batch(x)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    config = model.config

    height, width = images.shape[-2] * config.high_res // config.low_res, \
        images.shape[-1] * config.high_res // config.low_res
    # antialias=True makes torch's bicubic the same kernel as PIL's (a = -0.5), which is how the
    # public code prepared its sr_{low}_{high} condition images.
    condition = F.interpolate(images.to(device) * 2 - 1, size=(height, width), mode="bicubic",
                              align_corners=False, antialias=True).clamp(-1, 1)
    condition = _pad_to_multiple(condition, model.size_multiple)

    if schedule is None:
        schedule = NoiseSchedule.from_config(config.schedule)
        if sampler in MULTISTEP:       # evenly in log-SNR, as DPM-Solver++ steps
            schedule = respace_log_snr(schedule, steps, start_gamma)
        else:
            if start_gamma:
                schedule = truncate(schedule, start_gamma)
            schedule = respace(schedule, steps)
    elif isinstance(schedule, dict):
        schedule = NoiseSchedule.from_config(schedule)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
    y_T = None
    if start_gamma:   # y_T ~ q(y_T | y_0 = x): the condition noised to the chain's first level
        g_T = schedule.gammas[-1].item()
        noise_T = torch.randn(condition.shape, generator=generator, device=device)
        y_T = g_T ** 0.5 * condition.float() + (1 - g_T) ** 0.5 * noise_T

    if package is not None:        # opened here: the sampling loops read no files
        from .export import open_package
        package = open_package(package, model=model)
        if tile is None:           # a package runs the one size it was compiled for
            tile = False if tile_overlap is None and max_memory is None else tile
    tiler = tiler_for(model, condition.shape, device, dtype, tile, tile_overlap, max_memory)
    if tiler is not None and package is not None:
        raise ValueError("a package from `sr3fast export` runs the U-Net at the one size it was compiled "
                         "for, so it cannot run tiles; drop package= to tile, or pass tile=False")
    result = sample(sampler, tiler or model, condition.to(dtype), schedule, **options, y_T=y_T,
                    generator=generator, noise=noise, progress=progress, loop=loop, package=package)
    result = result[..., :height, :width].float()
    if not torch.isfinite(result).all():        # once, after the last step: no sync per step
        raise FloatingPointError(_non_finite_message(model, dtype))
    result = (result + 1) / 2
    if back_projections:
        result = back_project(result, images.to(result), back_projections)
    return from_unit_batch(result, kind)


_DEFAULT_MODELS: dict = {}


def _default_model():
    """The default model, loaded once per process (upscale(x) in a loop must not reread it)."""
    if "model" not in _DEFAULT_MODELS:
        _DEFAULT_MODELS["model"] = load(DEFAULT_MODEL)
    return _DEFAULT_MODELS["model"]


def _settings(model, sampler, steps, schedule, eta=None, start_gamma=None):
    """(sampler, steps, schedule, start_gamma) from the caller's, else the model's recommended,
    else the defaults. A schedule of the caller's is used as given (with start_gamma only if the
    caller gives it, matching the schedule's first level). Otherwise the recommended schedule is
    used at the requested steps when it can serve them (a tuned "lambda" schedule serves any;
    a fixed one its own count) and the sampling starts where it was tuned to start; failing
    that, the training schedule is respaced (and truncated at start_gamma) by upscale. eta is
    checked against the sampler it would go to."""
    from .diffusion.coefficients import ETA_DEFAULT

    recommended = getattr(model, "inference_settings", None) or InferenceSettings()
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_start_gamma(start_gamma)
    if schedule is not None:
        if start_gamma:
            check_schedule_start(schedule, start_gamma)
    else:
        if start_gamma is None:
            start_gamma = recommended.start_gamma
        if recommended.schedule is not None and start_gamma == recommended.start_gamma:
            schedule = schedule_for_steps(recommended.schedule, steps or recommended.steps)
    steps = steps or recommended.steps or 100
    sampler = sampler or recommended.sampler or _default_sampler(model)
    if eta is not None and not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic, 1: the posterior variance), "
                         f"got {eta!r}")
    if eta is not None and sampler not in ETA_DEFAULT:
        raise ValueError(f"eta is the noise scale of {' and '.join(ETA_DEFAULT)}, but the sampler is "
                         f"{sampler!r}, which has none; pass sampler='dpmpp_2m_sde', 'dpmpp_3m_sde' or 'ddim' "
                         "(--sampler) to use eta, or drop eta")
    return sampler, steps, schedule, start_gamma


def _back_projections(model, requested):
    recommended = getattr(model, "inference_settings", None) or InferenceSettings()
    value = recommended.back_projections if requested is None else requested
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"back_projections must be an integer >= 0 (0: off), got {value!r}")
    return value


def _non_finite_message(model, dtype) -> str:
    """Why a sampled image holds NaN or Inf, as far as can be told, and what to do."""
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        cause = (f"the model's weights hold NaN or Inf ({shown}): the checkpoint is damaged or its "
                 "training diverged; use another checkpoint")
    elif dtype in (torch.float16, torch.bfloat16):
        cause = f"the model overflowed in {str(dtype).removeprefix('torch.')}; run it in float32"
    else:
        cause = "the model produced them from finite weights; check the checkpoint and the input"
    return f"the sampled image holds NaN or Inf values, so nothing was returned: {cause}"


def _pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    pad_h, pad_w = -images.shape[-2] % multiple, -images.shape[-1] % multiple
    if not (pad_h or pad_w):
        return images
    # Reflection needs the pad to be smaller than the side; tiny images are replicated instead.
    small = pad_h >= images.shape[-2] or pad_w >= images.shape[-1]
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate" if small else "reflect")
