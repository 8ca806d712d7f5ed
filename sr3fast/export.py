"""The U-Net compiled ahead of time: `model.predict_noise` exported with torch.export and compiled
by AOTInductor into a `.pt2` package, for `loop="cpp"` / `loop="graph"` and for C++ programs
(`sr3fast_sample`, built by CMakeLists.txt), which run it without Python.

    path = sr3fast.export.export(model, "unet.pt2", batch=1, size=128)   # slow: compiles
    sr3fast.upscale(image, model, loop="cpp", package=path)
    y0 = sample("posterior", None, x, schedule, package=open_package(path, model=model))

A package takes the inputs it was compiled for, (x, y_t, gamma) with x and y_t of one shape
(B, C, H, W) and dtype on one device, and gamma (B,) float32, so that shape, dtype and device are
stored in the package's metadata with the model's config and a fingerprint of its weights;
`PackageInfo.check` compares an input against them before the package sees it, and
`PackageInfo.check_model` refuses a package exported from another model. Weights are frozen into
the package (inductor `freezing`). The ops of the backend selected while exporting are compiled
in: on a CPU that is the extension's `sr3fast::conv2d`, whose prepacked weights AOTInductor's own
CPU code lacks, so loading a package imports the extension first (its schemas must be registered
before the package's code can find them).

Packages are opened here, in the product layer, and handed to the sampling loops
(sr3fast.diffusion) as a denoiser (`Package`): the loops never read files.

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
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_path, fsync_dir

FORMAT = "sr3fast-denoiser-1"  # metadata "sr3fast.format": what the package is and its inputs
# The weights fingerprint (see weights_fingerprint): how many weight tensors, values from each.
FINGERPRINT_TENSORS = 16
FINGERPRINT_VALUES = 4
# Two fingerprints match when every value agrees to this relative tolerance (plus FINGERPRINT_ATOL):
# wide enough for the same weights stored in bfloat16 (relative rounding 2^-8) or float16
# (2^-11, and its subnormals below 6e-5: FINGERPRINT_ATOL), far narrower than the difference
# between two trainings or initialisations, whose weights differ by their own size.
FINGERPRINT_RTOL = 2.0 ** -6
FINGERPRINT_ATOL = 1e-6


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
    info = PackageInfo(shape=tuple(x.shape), dtype=dtype, device_type=device.type,
                       config=config.to_dict(), weights=weights_fingerprint(model))
    return export_denoiser(model, x, path, info.metadata())


def weights_fingerprint(model) -> tuple[float, ...]:
    """A few of the model's weights, at fixed places: FINGERPRINT_VALUES values (at 1/8, 3/8, 5/8
    and 7/8 of the flattened tensor) from each of FINGERPRINT_TENSORS weight tensors spread evenly
    over the state_dict (those of 2 or more dimensions: convolution and linear weights, which
    initialisation randomises and training moves, unlike GroupNorm's ones and zeros). Cheap at
    any model size, independent of the device and close to independent of the dtype (compare
    with `fingerprints_match`); two different models share it only by accident of 64 values."""
    tensors = [t for _, t in sorted(model.state_dict().items())
               if t.is_floating_point() and t.dim() >= 2 and t.numel() >= FINGERPRINT_VALUES]
    if not tensors:
        return ()
    count = min(FINGERPRINT_TENSORS, len(tensors))
    chosen = [tensors[(2 * k + 1) * len(tensors) // (2 * count)] for k in range(count)]
    values = []
    for tensor in chosen:
        flat = tensor.detach().reshape(-1)
        positions = [(2 * k + 1) * flat.numel() // (2 * FINGERPRINT_VALUES) for k in range(FINGERPRINT_VALUES)]
        values += flat[positions].double().cpu().tolist()
    return tuple(values)


def fingerprints_match(a, b) -> bool:
    return len(a) == len(b) and all(math.isclose(p, q, rel_tol=FINGERPRINT_RTOL, abs_tol=FINGERPRINT_ATOL)
                                    for p, q in zip(a, b))


@dataclass(frozen=True)
class PackageInfo:
    """What an sr3fast package was compiled for (its metadata)."""
    shape: tuple[int, ...]   # of x and y_t: (B, C, H, W)
    dtype: torch.dtype       # of x and y_t
    device_type: str         # "cpu" or "cuda"
    config: dict             # SR3Config.to_dict() of the exported model
    weights: tuple[float, ...] | None = field(default=None)  # weights_fingerprint; None: older package

    def metadata(self) -> dict[str, str]:
        metadata = {"sr3fast.format": FORMAT, "sr3fast.shape": ",".join(map(str, self.shape)),
                    "sr3fast.dtype": _dtype_name(self.dtype),
                    "sr3fast.device": self.device_type, "sr3fast.config": json.dumps(self.config)}
        if self.weights is not None:
            metadata["sr3fast.weights"] = json.dumps(list(self.weights))
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], path) -> "PackageInfo":
        if metadata.get("sr3fast.format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not an sr3fast denoiser package (no "
                             f"sr3fast.format={FORMAT} in its metadata); write one with "
                             "`sr3fast export` or sr3fast.export.export")
        return cls(shape=tuple(int(n) for n in metadata["sr3fast.shape"].split(",")),
                   dtype=getattr(torch, metadata["sr3fast.dtype"]),
                   device_type=metadata["sr3fast.device"],
                   config=json.loads(metadata["sr3fast.config"]),
                   weights=tuple(json.loads(metadata["sr3fast.weights"]))
                   if "sr3fast.weights" in metadata else None)

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

    def check_model(self, model, path) -> None:
        """Raise a ValueError when the package was exported from another model than `model`: its
        config (all but the description) or its weights fingerprint differ. Packages written
        before the fingerprint existed are checked on the config alone."""
        ours = {k: v for k, v in model.config.to_dict().items() if k != "description"}
        theirs = {k: v for k, v in self.config.items() if k != "description"}
        differences = _differences(theirs, ours)
        if differences:
            shown = "; ".join(f"{key}: package {a!r}, model {b!r}" for key, a, b in differences[:6])
            more = f" (and {len(differences) - 6} more)" if len(differences) > 6 else ""
            raise ValueError(f"package {str(path)!r} was exported from a model with another config "
                             f"({shown}{more}); export it from this model: sr3fast export MODEL "
                             "-o PACKAGE.pt2")
        if self.weights is not None and not fingerprints_match(self.weights, weights_fingerprint(model)):
            raise ValueError(f"package {str(path)!r} was exported from another model: same "
                             "architecture, different weights (its weights fingerprint does not "
                             "match this model's); export it from this model: sr3fast export "
                             "MODEL -o PACKAGE.pt2")


def _differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, a's value, b's value) wherever two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            found += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return found
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "float32", as torch.float32 is spelled in Python


def load_package(path: str | os.PathLike, device: torch.device | None = None):
    """(runner, info): the package as a callable runner(x, y_t, gamma) -> eps, and its PackageInfo."""
    path = _existing_package(path)
    index = -1 if device is None or device.index is None else device.index
    extension_error = _register_extension_ops()
    try:
        runner = torch._inductor.aoti_load_package(str(path), device_index=index)
    except RuntimeError as err:
        if "Could not find schema for sr3fast::" not in str(err):
            raise
        raise RuntimeError(f"package {str(path)!r} calls sr3fast's compiled ops ({err}), and the "
                           f"extension sr3fast._C that registers them cannot be imported here "
                           f"({extension_error}); build it (`pip install --no-build-isolation -e .`, "
                           "see README) or export the package under sr3fast.backend('reference') "
                           "(plain aten ops)") from None
    info = PackageInfo.from_metadata(runner.get_metadata(), path)
    return runner, info


def _existing_package(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no package at {str(path)!r}; write one with `sr3fast export`")
    return path


def _register_extension_ops() -> str | None:
    """Import sr3fast._C, which registers the C++ ops (torch.ops.sr3fast.*) that a package exported
    under the cpu or cuda backend calls: AOTInductor looks their schemas up when it loads the
    package, and nothing else in a fresh process may have imported the extension yet. None when
    it is registered, else why not (a package of plain aten or Triton code needs none of it)."""
    try:
        import sr3fast._C  # noqa: F401  (registers torch.ops.sr3fast.*)
    except ImportError as err:
        return str(err)
    return None


class Package:
    """A package from `sr3fast export`, opened as a denoiser for the sampling loops
    (sr3fast.diffusion): pass it as the samplers' model (or package=).

    `denoiser_for(x, loop)` is what the loops ask a denoiser for: for loop="cpp" the package's
    path (the C++ loop loads and runs it without Python, checked by the extension's loader), for
    the Python loops a runner loaded once per device. Either way the inputs are checked against
    the package's metadata first and, when `model` is given, the package against the model
    (`PackageInfo.check_model`): a package exported from another model is refused, not used.
    `predict_noise(x, y_t, gamma)` runs the package like a model's.
    """

    def __init__(self, path: str | os.PathLike, model=None):
        self.path = _existing_package(path)
        self.model = model
        self._runners: dict = {}      # device -> (runner, info)

    def __repr__(self) -> str:
        return f"Package({str(self.path)!r})"

    def denoiser_for(self, x: torch.Tensor, loop: str):
        if loop == "cpp":
            from .diffusion.loops import compiled_extension

            _register_extension_ops()
            metadata = compiled_extension(loop).package_metadata(str(self.path), x.device)
            self._check(PackageInfo.from_metadata(metadata, self.path), x)
            return str(self.path)
        runner, info = self._runner(x.device)
        self._check(info, x)
        return runner

    def predict_noise(self, x: torch.Tensor, y_t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return self.denoiser_for(x, "python")(x, y_t, gamma)

    def info(self, device: torch.device | str | None = None) -> PackageInfo:
        return self._runner(torch.device(device) if device is not None else None)[1]

    def _runner(self, device: torch.device | None):
        if device not in self._runners:
            self._runners[device] = load_package(self.path, device)
        return self._runners[device]

    def _check(self, info: PackageInfo, x: torch.Tensor) -> None:
        info.check(x, self.path)
        if self.model is not None:
            info.check_model(self.model, self.path)


def open_package(source, model=None) -> Package:
    """`source` (a path from `sr3fast export`, or a Package) as a Package checked against `model`
    (when given) before it runs: what sr3fast.upscale(package=) and the CLI's --package use."""
    if isinstance(source, Package) and (model is None or source.model is model):
        return source
    return Package(source.path if isinstance(source, Package) else source, model=model)


def save_sampling_inputs(path: str | os.PathLike, x: torch.Tensor, schedule, sampler: str, *,
                         seed: int = 0, eta: float | None = None, clip: float | None | str = "default",
                         y_T: torch.Tensor | None = None) -> Path:
    """Write what a C++ program needs, besides the package, to run `sampler` over `schedule` on
    the condition x (B, C, H, W): one torch.save file (read in C++ with torch::pickle_load) of

        x          (B, C, H, W)   the upsampled condition, in the package's dtype
        coefs      (T, B, 7)      float32 (a, b, m0, m1, sigma, m2, m3): sr3fast.diffusion's
                                  reverse_coefficients
        gammas     (T, B)         float32, sr3fast.diffusion.noise_levels
        stochastic, seed          0-d bool / int64: whether steps add noise; the generator's seed
        history    0-d int64      how many past x0 estimates each step carries
                                  (sr3fast.diffusion.HISTORY: 1 for DPM-Solver++ 2M, 2 for 3M)
        multistep  0-d bool       history > 0, for sr3fast_sample programs from before history
        clip       0-d float64    present only when the sampler clamps its x0 estimate
        y_T        (B, C, H, W)   present only when given; else drawn from the seeded generator

    A Python sampler with generator=torch.Generator(x.device).manual_seed(seed) draws the same
    noise. eta: as the samplers take it (None: the sampler's default, sr3fast.diffusion's
    ETA_DEFAULT). clip="default" takes the sampler's (sr3fast.diffusion.CLIP)."""
    from .diffusion import CLIP, noise_levels, reverse_coefficients
    from .diffusion.coefficients import HISTORY, is_stochastic

    if clip == "default":
        clip = CLIP[sampler]
    batch = x.shape[0]
    record = {
        "x": x.detach().cpu(),
        "coefs": reverse_coefficients(schedule, sampler, batch, "cpu", eta=eta),
        "gammas": noise_levels(schedule, batch, "cpu"),
        "stochastic": torch.tensor(is_stochastic(schedule, sampler, eta)),
        "history": torch.tensor(HISTORY.get(sampler, 0), dtype=torch.int64),
        "multistep": torch.tensor(sampler in HISTORY),
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
