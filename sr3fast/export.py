"""The U-Net compiled ahead of time: `model.predict_noise` exported with torch.export and compiled
by AOTInductor into a `.pt2` package, for `loop="cpp"` / `loop="graph"` and for C++ programs
(`sr3fast_sample`, built by CMakeLists.txt), which run it without Python.

    path = sr3fast.export.export(model, "unet.pt2", batch=1, size=128)   # slow: compiles
    sr3fast.upscale(image, model, loop="cpp", package=path)

A package takes the inputs it was compiled for, (x, y_t, gamma) with x and y_t of one shape
(B, C, H, W) and dtype on one device, and gamma (B,) float32, so that shape, dtype and device are
stored in the package's metadata with the model's config; `PackageInfo.check` compares an input
against them before the package sees it. Weights are frozen into the package (inductor
`freezing`). The ops of the backend selected while exporting are compiled in: on a CPU that is
the extension's `sr3fast::conv2d`, whose prepacked weights AOTInductor's own CPU code lacks.

Precision on CUDA: the package's convolutions and matmuls call cuDNN / cuBLAS under the running
process's TF32 switches, as eager PyTorch does (torch.backends.cudnn.allow_tf32, on by default;
torch.backends.cuda.matmul.allow_tf32, off by default; inductor's own Triton matmul templates,
used only with max-autotune, take them at compile time). Inductor may pick other algorithms and
layouts than eager, so package and eager agree to TF32's rounding (about 1e-3 relative) with
TF32 on, and to float32's with both switches off.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_path, fsync_dir

FORMAT = "sr3fast-denoiser-1"  # metadata "sr3fast.format": what the package is and its inputs


class _PredictNoise(torch.nn.Module):
    """model.predict_noise(x, y_t, gamma) as a module's forward, for torch.export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y_t, gamma):
        return self.model.predict_noise(x, y_t, gamma)


def export_denoiser(model, x: torch.Tensor, path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> Path:
    """Compile model.predict_noise for inputs shaped like x (x, y_t like x; gamma (B,) float32)
    into an AOTInductor package at `path`, written atomically; returns the path. model: anything
    with predict_noise(x, y_t, gamma) -> eps, on x's device and in x's dtype. `metadata` is stored
    in the package (str -> str)."""
    path = Path(path)
    if not path.parent.is_dir():  # before minutes of compiling, not after
        raise FileNotFoundError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist")
    gamma = torch.full((x.shape[0],), 0.5, device=x.device)
    with torch.no_grad():
        program = torch.export.export(_PredictNoise(model).eval(), (x, x.clone(), gamma))
    configs = {"aot_inductor.metadata": dict(metadata or {})}
    # Staged under its final name in a private folder beside it (the archive's entries are named
    # after the file), then renamed into place: never a half-written package at `path`.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as folder, \
            torch._inductor.config.patch(freezing=True):
        staged = Path(folder) / path.name
        torch._inductor.aoti_compile_and_package(program, package_path=str(staged),
                                                 inductor_configs=configs)
        with open(staged, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, path)
    fsync_dir(path.parent)
    return path


def export(model, path: str | os.PathLike, *, batch: int = 1, size: int | tuple[int, int] | None = None,
           device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Path:
    """Export an SR3 model's denoiser for `batch` images of `size` (the high-resolution side, or
    (height, width); default: the model's high_res) on `device` in `dtype` (default: the model's).
    Returns the package path. Sizes must be multiples of model.size_multiple."""
    from .model import SR3

    if not isinstance(model, SR3):
        raise TypeError(f"export takes an sr3fast SR3 model (sr3fast.load(...)), got {type(model).__name__}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    config = model.config
    height, width = (size, size) if isinstance(size, int) else (size or (config.high_res,) * 2)
    multiple = model.size_multiple
    if height % multiple or width % multiple or height < 1 or width < 1:
        raise ValueError(f"size {height}x{width} is not a multiple of {multiple}, which this U-Net "
                         f"needs ({config.unet.levels} levels); pick e.g. "
                         f"{-(-height // multiple) * multiple}x{-(-width // multiple) * multiple}")
    parameter = next(model.parameters())
    device = torch.device(device) if device is not None else parameter.device
    dtype = dtype or parameter.dtype
    if (device, dtype) != (parameter.device, parameter.dtype):
        model = copy.deepcopy(model).to(device=device, dtype=dtype)  # the caller's model stays put
    model.eval()
    channels = config.unet.out_channel
    x = torch.zeros(batch, channels, height, width, device=device, dtype=dtype)
    info = PackageInfo(shape=tuple(x.shape), dtype=dtype, device_type=device.type, config=config.to_dict())
    return export_denoiser(model, x, path, info.metadata())


@dataclass(frozen=True)
class PackageInfo:
    """What an sr3fast package was compiled for (its metadata)."""
    shape: tuple[int, ...]   # of x and y_t: (B, C, H, W)
    dtype: torch.dtype       # of x and y_t
    device_type: str         # "cpu" or "cuda"
    config: dict             # SR3Config.to_dict() of the exported model

    def metadata(self) -> dict[str, str]:
        return {"sr3fast.format": FORMAT, "sr3fast.shape": ",".join(map(str, self.shape)),
                "sr3fast.dtype": _dtype_name(self.dtype),
                "sr3fast.device": self.device_type, "sr3fast.config": json.dumps(self.config)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], path) -> "PackageInfo":
        if metadata.get("sr3fast.format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not an sr3fast denoiser package (no "
                             f"sr3fast.format={FORMAT} in its metadata); write one with "
                             "`sr3fast export` or sr3fast.export.export")
        return cls(shape=tuple(int(n) for n in metadata["sr3fast.shape"].split(",")),
                   dtype=getattr(torch, metadata["sr3fast.dtype"]),
                   device_type=metadata["sr3fast.device"],
                   config=json.loads(metadata["sr3fast.config"]))

    def check(self, x: torch.Tensor, path) -> None:
        """Raise a ValueError naming the difference when the package cannot take x."""
        if tuple(x.shape) == self.shape and x.dtype == self.dtype and x.device.type == self.device_type:
            return
        found = f"{tuple(x.shape)} {_dtype_name(x.dtype)} on {x.device.type}"
        wanted = f"{self.shape} {_dtype_name(self.dtype)} on {self.device_type}"
        batch, _, height, width = x.shape
        raise ValueError(f"package {str(path)!r} was compiled for inputs {wanted}, got {found}; "
                         f"export one for these: sr3fast export MODEL --batch {batch} "
                         f"--size {height}x{width} --device {x.device.type} "
                         f"--dtype {_dtype_name(x.dtype)} -o PACKAGE.pt2")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "float32", as torch.float32 is spelled in Python


def load_package(path: str | os.PathLike, device: torch.device | None = None):
    """(runner, info): the package as a callable runner(x, y_t, gamma) -> eps, and its PackageInfo."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no package at {str(path)!r}; write one with `sr3fast export`")
    index = -1 if device is None or device.index is None else device.index
    runner = torch._inductor.aoti_load_package(str(path), device_index=index)
    info = PackageInfo.from_metadata(runner.get_metadata(), path)
    return runner, info


def save_sampling_inputs(path: str | os.PathLike, x: torch.Tensor, schedule, sampler: str, *,
                         seed: int = 0, eta: float = 0.0, clip: float | None | str = "default",
                         y_T: torch.Tensor | None = None) -> Path:
    """Write what a C++ program needs, besides the package, to run `sampler` over `schedule` on
    the condition x (B, C, H, W): one torch.save file (read in C++ with torch::pickle_load) of

        x       (B, C, H, W)   the upsampled condition, in the package's dtype
        coefs   (T, B, 5)      float32, sr3fast.diffusion.reverse_coefficients
        gammas  (T, B)         float32, sr3fast.diffusion.noise_levels
        stochastic, seed       0-d bool / int64: whether steps add noise; the generator's seed
        clip    0-d float64    present only when the sampler clamps its x0 estimate
        y_T     (B, C, H, W)   present only when given; else drawn from the seeded generator

    A Python sampler with generator=torch.Generator(x.device).manual_seed(seed) draws the same
    noise. clip="default" takes the sampler's (sr3fast.diffusion.CLIP)."""
    from .diffusion import CLIP, noise_levels, reverse_coefficients

    if clip == "default":
        clip = CLIP[sampler]
    batch = x.shape[0]
    record = {
        "x": x.detach().cpu(),
        "coefs": reverse_coefficients(schedule, sampler, batch, "cpu", eta=eta),
        "gammas": noise_levels(schedule, batch, "cpu"),
        "stochastic": torch.tensor(sampler != "ddim" or eta > 0),
        "seed": torch.tensor(int(seed), dtype=torch.int64),
    }
    if clip is not None:
        record["clip"] = torch.tensor(float(clip), dtype=torch.float64)
    if y_T is not None:
        record["y_T"] = y_T.detach().to("cpu", torch.float32)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
    return path
