"""Sampling-loop benchmarks: where the steps of a sampling call run (sr3fast.diffusion.loops).

One row per configuration x batch x loop. The unit of work is a whole `steps`-step
`sr3fast.diffusion.sample` call (sampler "posterior", fused ops on the auto backend, bf16 on
GPU, float32 on CPU); ms/step is its median over `steps`. Each row also reports

    denoiser ms    one U-Net evaluation alone, in the same dtype and form (module or package):
                   on a GPU replayed as one CUDA graph, i.e. its kernel time with no launch gaps,
                   the floor a loop can reach; on a CPU a plain call
    overhead/step  ms/step - denoiser ms: the loop's own cost per step (noise, reverse_step,
                   Python or C++ bookkeeping, launch gaps); the graph loop's target is < 20 µs

Keys (--impl):
  loop-python         loop="python" with the model
  loop-cpp            loop="cpp", the model's predict_noise called back from C++
  loop-cpp-package    loop="cpp" with the U-Net exported by `sr3fast export` (AOTInductor, frozen
                      weights): no Python between or inside steps
  loop-graph          loop="graph" (CUDA): one CUDA-graph launch per step, the model captured
  loop-graph-package  loop="graph" with the exported U-Net
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import sr3fast

from . import metrics
from .model_bench import ModelCache, _release, dtype_name, step_inputs
from .records import Row, measuring
from .timing import Budget, cuda_graph, measure

SAMPLER = "posterior"
GPU_STEPS, CPU_STEPS = 50, 5   # per timed call; a CPU step of the 16->128 U-Net takes ~0.6 s
BASELINE = "python loop"


@dataclass(frozen=True)
class LoopImpl:
    key: str
    label: str
    loop: str
    package: bool = False


LOOP_IMPLS = (
    LoopImpl("loop-python", BASELINE, "python"),
    LoopImpl("loop-cpp", "C++ loop", "cpp"),
    LoopImpl("loop-cpp-package", "C++ loop + package", "cpp", package=True),
    LoopImpl("loop-graph", "graph loop", "graph"),
    LoopImpl("loop-graph-package", "graph loop + package", "graph", package=True),
)
KEYS = tuple(impl.key for impl in LOOP_IMPLS)


def default_steps(device: torch.device) -> int:
    return GPU_STEPS if device.type == "cuda" else CPU_STEPS


def unavailable(impl: LoopImpl, device: torch.device) -> str | None:
    """Why `impl` cannot run on `device`, or None."""
    if impl.loop == "graph" and device.type != "cuda":
        return "CUDA graphs need a GPU"
    if impl.loop == "cpp" or impl.package:
        try:
            import sr3fast._C  # noqa: F401
        except ImportError as err:
            return f"the compiled extension sr3fast._C is not built ({err})"
    return None


def run_loops(config: str, batches: list[int], impls: list[LoopImpl], device: torch.device,
              budget: Budget, steps: int, progress: Callable[[str], None] = lambda message: None,
              on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """The rows of `impls` for `config` at each batch, speed-ups over the Python loop; each row
    is also handed to `on_row` as soon as it is measured."""
    from sr3fast.diffusion import NoiseSchedule, respace

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = ModelCache(config, device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sr3fast-bench-") as folder, sr3fast.backend("auto"), \
            torch.no_grad():
        model = models.get(dtype)
        schedule = respace(NoiseSchedule.from_config(model.config.schedule), steps)
        for batch in batches:
            inputs = step_inputs(model, batch, dtype, device)
            packages = _Packages(model, inputs[0], Path(folder) / f"{config}-b{batch}.pt2")
            floors: dict[bool, tuple[float, Row]] = {}
            for impl in impls:
                progress(f"{config} batch {batch} {impl.key}")
                row = Row("loop", config, f"batch {batch}", impl.label, dtype_name(dtype), batch=batch)
                reason = unavailable(impl, device)
                if reason:
                    rows.append(row.skip(reason))
                    on_row(row)
                    continue
                with measuring(row, f" at batch {batch}", cleanup=lambda: _release(device)):
                    denoiser = model.predict_noise
                    if impl.package:
                        denoiser, row.compile_s = packages.get(device)
                    if impl.package not in floors:
                        floors[impl.package] = _denoiser_ms(denoiser, inputs, device, budget)
                    _measure_loop(row, impl, model, packages.path if impl.package else None, inputs[0],
                                  schedule, steps, budget, device, floors[impl.package])
                rows.append(row)
                on_row(row)
    models.clear()
    metrics.add_speedups(rows, BASELINE)
    return rows


STAND_IN = "stand-in denoiser"
STAND_IN_SHAPE = (1, 3, 128, 128)


def run_stand_in(impls: list[LoopImpl], device: torch.device, budget: Budget, steps: int,
                 progress: Callable[[str], None] = lambda message: None,
                 on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """The loops around a denoiser that costs almost nothing (eps = 0.5·y_t, one elementwise
    op), so that ms/step is the loop's own per-step cost: noise, reverse_step, bookkeeping.
    Package rows are left out (there is no U-Net to export)."""
    from types import SimpleNamespace

    from sr3fast.diffusion import NoiseSchedule, sample

    schedule = NoiseSchedule.from_config({"schedule": "linear", "n_timestep": steps,
                                          "linear_start": 1e-4, "linear_end": 2e-2})
    model = SimpleNamespace(predict_noise=lambda x, y_t, gamma: y_t * 0.5)
    x = torch.zeros(STAND_IN_SHAPE, device=device)
    shape = "x".join(map(str, STAND_IN_SHAPE))
    rows = []
    with sr3fast.backend("auto"), torch.no_grad():
        denoiser_ms = _denoiser_ms(model.predict_noise, (x, x, torch.ones(1, device=device)), device, budget)
        for impl in impls:
            if impl.package:
                continue
            progress(f"{STAND_IN} {impl.key}")
            row = Row("loop", STAND_IN, shape, impl.label, "float32", batch=1)
            reason = unavailable(impl, device)
            if reason:
                rows.append(row.skip(reason))
                on_row(row)
                continue
            with measuring(row, f" at {shape}"):
                _measure_loop(row, impl, model, None, x, schedule, steps, budget, device, denoiser_ms)
                row.note = "eps = 0.5·y_t: ms/step is the loop's own cost"
            rows.append(row)
            on_row(row)
    metrics.add_speedups(rows, BASELINE)
    return rows


class _Packages:
    """The configuration's U-Net exported once per batch, on first use (compile time reported)."""

    def __init__(self, model, x: torch.Tensor, path: Path):
        self.model, self.x, self.path = model, x, path
        self._runner, self._compile_s = None, None

    def get(self, device: torch.device):
        from sr3fast.export import export, load_package
        if self._runner is None:
            start = time.perf_counter()
            export(self.model, self.path, batch=self.x.shape[0], size=tuple(self.x.shape[-2:]),
                   device=device, dtype=self.x.dtype)
            self._compile_s = time.perf_counter() - start
            self._runner, _ = load_package(self.path, device)
        return self._runner, self._compile_s


def _denoiser_ms(denoiser, inputs: tuple, device: torch.device, budget: Budget) -> float:
    """One denoiser call's median time: its kernels replayed as a CUDA graph on a GPU."""
    step = lambda: denoiser(*inputs)  # noqa: E731
    if device.type == "cuda":
        step = cuda_graph(step, device)
    return measure(step, device, budget).median_ms


def _measure_loop(row: Row, impl: LoopImpl, model, package: Path | None, x: torch.Tensor, schedule,
                  steps: int, budget: Budget, device: torch.device, denoiser_ms: float) -> None:
    from sr3fast.diffusion import sample
    from sr3fast.export import open_package

    generator = torch.Generator(device=device).manual_seed(0)
    opened = open_package(package, model=model) if package else None   # opened once, outside the timing
    call = lambda: sample(SAMPLER, model, x, schedule, generator=generator, loop=impl.loop,  # noqa: E731
                          package=opened)
    timing = measure(call, device, Budget(1, budget.min_repeats, budget.max_repeats, budget.target_s))
    summary = timing.summary()
    row.set_timing({key: value / steps if key.endswith("_ms") else value for key, value in summary.items()})
    row.sampling_steps = steps
    row.images_per_s = row.batch / (timing.median_ms / 1e3)
    row.images_per_s_source = "measured"
    row.extra.update(call_ms=timing.median_ms, steps=steps, sampler=SAMPLER, denoiser_ms=denoiser_ms,
                     overhead_us_per_step=(row.median_ms - denoiser_ms) * 1e3)
    row.note = "U-Net: AOTInductor package" if package else None
