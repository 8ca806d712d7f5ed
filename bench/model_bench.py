"""U-Net step benchmarks: one row per configuration x batch x implementation.

The unit of work is one `model.predict_noise(x, y_t, gamma)` call, a sampling step's network
evaluation; images/s of a whole sampling run is derived from it (or measured, on request).
Implementations (the `key` selects them on the command line):

  reference-eager          reference backend, float32, eager: the baseline of every speed-up
  reference-compiled       the same under torch.compile (max-autotune on GPU: inductor's own
                           CUDA graphs included; the default mode on CPU, with inductor's
                           freezing: weights constant, oneDNN convolution weights prepacked)
  reference-compiled-bf16  the same in bfloat16 (GPU): the strongest plain-PyTorch baseline at
                           the fused rows' precision, so their speed-up is not all bf16's
  fused-<backend>          sr3fast's fused ops on that backend, eager; bf16 on GPU
  fused-compiled           the fastest backend per op (auto) under torch.compile, as
                           reference-compiled
  fused-compiled-graph     the fastest backend per op (auto), torch.compile
                           (max-autotune-no-cudagraphs) and the step captured as one CUDA graph

The sampling loops (Python, C++, CUDA graph) are measured by loop_bench.
"""
from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Callable

import torch

import sr3fast
from sr3fast import backends

from . import counting, hardware, metrics, report
from .availability import backend_unavailable
from .memory import peak_memory
from .records import Row, measuring
from .timing import Budget, cuda_graph, measure, time_first_call

DEFAULT_CONFIGS = ("public-16-128", "public-64-512", "paper-64-256", "small")
QUICK_CONFIGS = ("tiny",)
GPU_BATCHES = (1, 4, 16)
CPU_BATCHES = (1,)
# A CPU runs about 0.05-0.2 TFLOP/s: above this many GFLOP per step a row takes minutes, so a
# default CPU run leaves the configuration out (and says so); --config runs it anyway.
CPU_DEFAULT_MAX_GFLOP = 200
STEP_OPS = ("groupnorm_silu", "attention")  # the fused ops inside predict_noise
_INDUCTOR_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
RUN_MODE = "run"                         # the run's --compile-mode
RUN_MODE_NO_GRAPHS = "run-no-cudagraphs"  # the same without inductor's CUDA graphs (we capture one)


@dataclass(frozen=True)
class Implementation:
    key: str
    label: str
    backend: str                 # sr3fast backend selected while the row runs
    gpu_dtype: torch.dtype       # CPU rows are float32 (GPU-only rows keep theirs to say what they are)
    compile_mode: str | None = None   # None: eager; RUN_MODE or RUN_MODE_NO_GRAPHS
    cuda_graph: bool = False
    cuda_only: bool = False

    def dtype(self, device: torch.device) -> torch.dtype:
        return self.gpu_dtype if device.type == "cuda" or self.cuda_only else torch.float32


IMPLEMENTATIONS = (
    Implementation("reference-eager", "reference eager", "reference", torch.float32),
    Implementation("reference-eager-bf16", "reference eager", "reference", torch.bfloat16, cuda_only=True),
    Implementation("reference-compiled", "reference compiled", "reference", torch.float32, RUN_MODE),
    Implementation("reference-compiled-bf16", "reference compiled", "reference", torch.bfloat16, RUN_MODE,
                   cuda_only=True),
    *(Implementation(f"fused-{name}", f"fused {name}", name, torch.bfloat16)
      for name in ("triton", "cuda", "cpu")),
    Implementation("fused-graph", "fused auto + graph", "auto", torch.bfloat16, cuda_graph=True,
                   cuda_only=True),
    Implementation("fused-compiled", "fused auto + compile", "auto", torch.bfloat16, RUN_MODE),
    Implementation("fused-compiled-graph", "fused auto + compile + graph", "auto", torch.bfloat16,
                   RUN_MODE_NO_GRAPHS, cuda_graph=True, cuda_only=True),
)
KEYS = tuple(impl.key for impl in IMPLEMENTATIONS)
BASELINE = "reference eager"


@dataclass
class ModelSettings:
    device: torch.device
    budget: Budget
    compile_mode: str            # the run's torch.compile mode
    steps: int                   # sampling steps for images/s
    measure_sampling: bool
    skip_compiled: str | None = None   # reason to leave compiled rows out (--quick)
    cpu_defaults: bool = False         # leave out configurations too big for a CPU, saying so
    sampler: str = "posterior"


def run_config(config: str, batches: list[int], implementations: list[Implementation],
               settings: ModelSettings, progress: Callable[[str], None] = lambda message: None,
               on_row: Callable[[Row], None] = lambda row: None) -> tuple[str, list[Row]]:
    """(a one-line description of `config`, its rows: every batch x implementation), with
    rates, % of peak and roofline, images/s and speed-ups over reference eager filled in."""
    from sr3fast.model import presets
    device = settings.device
    spec = presets()[config]
    meta = meta_model(config)
    per_image = counting.count_step(meta, 1, spec.high_res)
    parameters = sum(p.numel() for p in meta.parameters())
    description = (f"{spec.low_res}->{spec.high_res}, {parameters / 1e6:.1f} M parameters, "
                   f"{report.quantity(per_image.flops / 1e9)} GFLOP per image per step")
    excluded = cpu_default_excludes(config, per_image) if settings.cpu_defaults else None
    if excluded:
        return description, [Row("model", config, "*", "all", "-").skip(excluded)]

    peak, tf32 = hardware.peak_for(device), hardware.tf32_enabled()
    models = ModelCache(config, device)
    rows = []
    for batch in batches:
        counts = counting.count_step(meta, batch, spec.high_res)
        for impl in implementations:
            progress(f"{config} batch {batch} {impl.key}")
            row = run_row(config, batch, impl, models, counts, settings)
            metrics.add_rates(row, peak, impl.dtype(device), tf32, "flops")
            metrics.add_derived_sampling(row, settings.steps)
            rows.append(row)
            on_row(row)
    models.clear()
    metrics.add_speedups(rows, BASELINE)
    return description, rows


def default_batches(device: torch.device) -> tuple[int, ...]:
    return GPU_BATCHES if device.type == "cuda" else CPU_BATCHES


def meta_model(config: str) -> torch.nn.Module:
    """The configuration's model on the meta device: its structure, no memory, no init time."""
    from sr3fast.model import build
    with torch.device("meta"):
        return build(config).eval()


def cpu_default_excludes(config: str, counts: counting.Counts) -> str | None:
    """Why a default CPU run leaves `config` out, or None."""
    gflop = counts.flops / 1e9
    if gflop <= CPU_DEFAULT_MAX_GFLOP:
        return None
    return (f"not run by default on a CPU: {gflop:.0f} GFLOP per step takes minutes per row here "
            f"(limit {CPU_DEFAULT_MAX_GFLOP} GFLOP); `--config {config}` runs it")


def impl_unavailable(impl: Implementation, device: torch.device) -> str | None:
    """Why `impl` cannot run on `device`, or None."""
    if impl.cuda_only and device.type != "cuda":
        return "GPU only (bf16 tensor cores, CUDA graphs)"
    if impl.backend == "auto":
        return None
    return backend_unavailable(impl.backend, device, STEP_OPS)


class ModelCache:
    """The models of one configuration on the device, one per dtype, built on first use."""

    def __init__(self, config: str, device: torch.device):
        self.config, self.device, self._models = config, device, {}

    def get(self, dtype: torch.dtype) -> torch.nn.Module:
        if dtype not in self._models:
            if torch.float32 not in self._models:
                from sr3fast.model import build
                with torch.device(self.device):
                    self._models[torch.float32] = build(self.config).eval()
            if dtype != torch.float32:
                self._models[dtype] = copy.deepcopy(self._models[torch.float32]).to(dtype)
        return self._models[dtype]

    def clear(self) -> None:
        self._models.clear()
        _release(self.device)


def step_inputs(model, batch: int, dtype: torch.dtype, device: torch.device):
    """Random x, y_t (batch, 3, S, S) in `dtype` and noise levels gamma (batch,) in float32, as
    the samplers pass them."""
    generator = torch.Generator(device=device).manual_seed(0)
    size = model.config.high_res
    x = torch.randn((batch, 3, size, size), generator=generator, device=device).clamp(-1, 1).to(dtype)
    y_t = torch.randn((batch, 3, size, size), generator=generator, device=device).to(dtype)
    gamma = torch.rand((batch,), generator=generator, device=device) * 0.99 + 0.01
    return x, y_t, gamma


def run_row(config: str, batch: int, impl: Implementation, models: ModelCache,
            counts: counting.Counts, settings: ModelSettings) -> Row:
    """Measure one implementation at one batch; a skipped or failed Row says why."""
    device = settings.device
    dtype = impl.dtype(device)
    row = Row("model", config, f"batch {batch}", impl.label, dtype_name(dtype), batch=batch)
    reason = impl_unavailable(impl, device) or (impl.compile_mode and settings.skip_compiled)
    if reason:
        return row.skip(reason)
    row.flops, row.bytes = counts.flops, counts.bytes(dtype)
    with measuring(row, f" at batch {batch}", cleanup=lambda: _release(device)):
        with sr3fast.backend(impl.backend), torch.inference_mode():
            row.backends = {op: backends.resolve(op, device.type) for op in STEP_OPS}
            model = models.get(dtype)
            x, y_t, gamma = step_inputs(model, batch, dtype, device)
            predict_noise = model.predict_noise
            notes = []
            if impl.compile_mode:
                mode = settings.compile_mode
                if impl.compile_mode == RUN_MODE_NO_GRAPHS:
                    mode = without_cuda_graphs(mode)
                predict_noise, row.compile_s, compile_notes = _compiled(predict_noise, (x, y_t, gamma), mode,
                                                                       device)
                notes += compile_notes
            step = partial(predict_noise, x, y_t, gamma)
            if impl.cuda_graph:
                start = time.perf_counter()
                step = cuda_graph(step, device)
                row.compile_s = (row.compile_s or 0.0) + time.perf_counter() - start
                notes.append("one CUDA graph per step (capture time in compile s)")
            with peak_memory(device) as peak:
                timing = measure(step, device, settings.budget)
            row.set_timing(timing.summary())
            row.peak_memory_bytes, row.memory_method = peak.bytes, peak.method
            if impl.backend != "reference":
                fallbacks = [op for op, name in row.backends.items() if name == "reference"]
                if fallbacks:
                    wanted = "fast" if impl.backend == "auto" else impl.backend
                    notes.append(f"{' and '.join(fallbacks)} ran on reference (no {wanted} kernel)")
            if settings.measure_sampling and not impl.cuda_graph:
                _measure_sampling(row, model, predict_noise, x, settings)
            row.note = "; ".join(notes) or None
    return row


def without_cuda_graphs(mode: str) -> str:
    """The torch.compile mode that optimises like `mode` but captures no CUDA graphs."""
    return {"max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": "default"}.get(mode, mode)


def _compiled(fn: Callable, args: tuple, mode: str, device: torch.device):
    """(compiled fn, compile seconds, notes: the mode, graph breaks, CUDA graphs skipped)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # a fresh cache per row: no reuse, no cache-size fallbacks to eager
    breaks_before = sum(counters["graph_break"].values())
    skips_before = counters["inductor"]["cudagraph_skips"]
    compiled = torch.compile(fn, mode=mode, dynamic=False)
    # Inference on a CPU: freezing folds the weights in as constants and prepacks the oneDNN
    # convolution weights once instead of reordering them on every call (inductor's CPU advice).
    freezing = device.type == "cpu"
    with torch._inductor.config.patch(freezing=freezing):
        compile_s = time_first_call(lambda: compiled(*args), device)
    notes = [f"torch.compile mode={mode}" + (", freezing" if freezing else "")]
    breaks = sum(counters["graph_break"].values()) - breaks_before
    if breaks:
        notes.append(f"{breaks} graph break(s)")
    if device.type != "cuda" or mode not in _INDUCTOR_CUDA_GRAPH_MODES:
        return compiled, compile_s, notes
    if counters["inductor"]["cudagraph_skips"] > skips_before:
        notes.append("inductor skipped its CUDA graphs")
    else:
        notes.append("inductor CUDA graphs")
    mark_step = torch.compiler.cudagraph_mark_step_begin

    def each_call_a_new_step(*call_args):  # tells cudagraph trees no earlier output is still read
        mark_step()
        return compiled(*call_args)
    return each_call_a_new_step, compile_s, notes


def _measure_sampling(row: Row, model, predict_noise: Callable, x: torch.Tensor, settings: ModelSettings) -> None:
    """Images/s of a real `settings.steps`-step sampling run (sr3fast.diffusion.sample)."""
    from sr3fast import diffusion

    denoiser = SimpleNamespace(predict_noise=predict_noise)  # all a sampler calls; may be compiled
    schedule = diffusion.respace(diffusion.NoiseSchedule.from_config(model.config.schedule), settings.steps)
    generator = torch.Generator(device=settings.device).manual_seed(0)
    run = lambda: diffusion.sample(settings.sampler, denoiser, x, schedule, generator=generator)  # noqa: E731
    budget = Budget(warmup=1, min_repeats=1, max_repeats=5, target_s=settings.budget.target_s)
    timing = measure(run, settings.device, budget)
    row.sampling_steps = settings.steps
    row.images_per_s = row.batch / (timing.median_ms / 1e3)
    row.images_per_s_source = "measured"
    row.extra["sampling"] = {"sampler": settings.sampler, **timing.summary()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
