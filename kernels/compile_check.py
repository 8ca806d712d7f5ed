"""Compile this package's Triton kernels for a CUDA GPU on a machine without one, and report each
compile: ok or failed (with the error's first line), registers, spills, shared memory, seconds.

    python -m sr3fast.kernels.compile_check --all     # every kernel x config x variant below
    python -m sr3fast.kernels.compile_check --quick   # what tests/test_triton_compile.py runs
    python -m kernels.compile_check --all             # the same, from a checkout's root
      [--exhaustive] [--arch 90] [--jobs N] [--kernel REGEX] [--dtype bf16 ...] [--json FILE]

Triton lowers a kernel for any CUDA target without a device (its ptxas ships in the wheel), so
compile failures (an MLIR pass that asserts, a ptxas error) and register spills show up here,
before a GPU session spends its minutes on them. What is compiled is what the launchers launch:
each launcher (groupnorm_silu forward/backward, attention forward/backward, reverse_step) runs
on meta tensors of SR3's shapes with its launches recorded instead of run, so every constexpr,
dtype and argument specialization (pointer alignment, integers divisible by 16, strides equal to
1) is the launcher's own. For each recorded launch of an autotuned kernel the configs of its GPU
config list are compiled (below); kernels that are not autotuned compile as launched. Identical
compiles (same specialization and options) are done once, reported under the first variant that
needs them with "(+n)" for the others (attention at d=1024, L=1024 compiles exactly as at d=512,
L=256: no constexpr or specialization differs). "#k/n" numbers a kernel's launches within one
call (attention backward's GEMMs: #1 dV = P^T dO, #2 dK = dS^T Q, #3 dQ = dS K).

Scopes
  --all (default)  every GPU config of every autotuned kernel, at each launch where its prune rule
                   keeps it in some dtype, in every dtype (a config kept nowhere: at every
                   launch). groupnorm_silu: one compile per kernel, config, dtype, boolean
                   constexprs (path, layout, masks, flags) and tile (BLOCK_C x BLOCK_S), standing
                   for the SR3 problems that differ only in groups per block or in which integer
                   arguments are multiples of 16 (the one with the most groups per block).
                   About 6.3K compiles: 30 min on 2 cores (Triton 3.6).
  --exhaustive     as --all without that grouping (~19K compiles).
  --quick          the config each autotuner runs when pinned (SR3FAST_TRITON_AUTOTUNE=pinned, as
                   in a GPU test session: the first its prune rule keeps) at a few variants:
                   groupnorm_silu in fp32 at one problem per path and layout (with the attention
                   norm's loop path, which once failed to compile), resblock and attn_norm flags;
                   attention (NCHW views) at d=512, L=256 and at the odd-sized L=15x15, and
                   reverse_step, in fp32 and bf16. ~101 compiles (~75 s on 2 cores at 93).

Variants
  groupnorm_silu  SR3's GroupNorms (the U-Nets of DESIGN.md Table A.1, 32 or 16 groups, batch 1 to
                  64) planned for an H200 (132 SMs): tile, loop and split paths, NCHW and NHWC;
                  x in fp32 / bf16 / fp16 (weight and bias fp32); flags: resblock (SiLU, shift,
                  affine), attn_norm (no activation, no shift, affine), bare (SiLU only); forward
                  and backward (training: a gradient for every input present).
  attention       SR3's single wide head: d=512 at L=256 (batch 1 and 16), d=1024 at L=1024, and
                  an odd-sized image (L=15x15, ragged: EVEN_M and EVEN_N off); q/k/v are strided
                  views of an NCHW or NHWC qkv convolution, as the U-Net passes them; fp32 / bf16 /
                  fp16; forward and backward.
  reverse_step    fp32 / bf16 / fp16, in-kernel or given noise, with and without the clip,
                  single-step and multistep (HAS_HISTORY: + m2·x0_prev, x0 written; HAS_HISTORY2:
                  + m3·x0_prev2 as well).

"kept" says whether the autotuner may run that config there (its prune rule keeps it). The exit
status is 1 when a compile fails or a kept config spills, else 0. Compiles run in --jobs
processes (default: the CPU count); a compile that crashes or hangs its process is reported as
failed. Registers and spills come from ptxas's own report (-v); "spills" is Triton's n_spills,
the kernel's local memory in 4-byte words (what CompiledKernel.n_spills reports on a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import os
import queue
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterable

DTYPES = ("fp32", "bf16", "fp16")
H200_MULTIPROCESSORS = 132

# SR3's U-Nets (DESIGN.md, Table A.1): base channels, depth multipliers, output resolution
SR3_UNETS = [(128, (1, 2, 4, 8, 8), 128), (128, (1, 2, 4, 4, 8, 8), 256),
             (64, (1, 2, 4, 8, 8, 16, 16), 512), (16, (1, 2, 4, 8, 16, 32, 32, 32), 1024)]
SR3_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# groupnorm_silu flag variants: name -> (act, shift, affine)
GN_FLAGS = {"resblock": (True, True, True), "attn_norm": (False, False, True),
            "bare": (True, False, False)}
# attention: (batch, length, width) of SR3's head, and an odd-sized image's (L = 15 x 15)
ATTENTION_SHAPES = [(1, 256, 512), (16, 256, 512), (1, 1024, 1024)]
ATTENTION_RAGGED = (1, 225, 512)


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def sr3_groupnorm_problems() -> list[tuple[int, int, int, int]]:
    """(batch, channels, spatial, groups) of SR3's GroupNorms: at each level ch·m channels at
    (res/2^level)², and the decoder's concatenations with a skip of the same or a neighbouring
    level (as tests/test_groupnorm_silu.py enumerates them)."""
    sizes = set()
    for ch, mults, res in SR3_UNETS:
        for level, m in enumerate(mults):
            concat = {ch * (m + mults[j]) for j in (level - 1, level, level + 1)
                      if 0 <= j < len(mults)}
            for chans in {ch * m} | concat:
                sizes.update((chans, (res >> level) ** 2, groups) for groups in (32, 16)
                             if chans % groups == 0)
    return [(batch, *size) for size in sorted(sizes) for batch in SR3_BATCHES]


# -------------------------------------------------------------------------------------------------
# Recording launches
# -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    kernel: Any            # the launched object: an Autotuner or a JITFunction
    args: tuple
    kwargs: dict
    family: str            # groupnorm_silu | attention | reverse_step
    dtype: str
    label: str             # the variant, without the dtype


def _kernel_modules():
    from . import attention, groupnorm_silu, reverse_step
    return {"groupnorm_silu": groupnorm_silu, "attention": attention,
            "reverse_step": reverse_step}


@contextlib.contextmanager
def _recording(into: list, family: str, dtype: str, label: str):
    """Within the block the kernel modules' launches are appended to `into` instead of run."""
    modules = _kernel_modules()

    def wrap(kernel):
        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    into.append(Launch(kernel, args, kwargs, family, dtype, label))
                return launch
        return Recorder()

    gn = modules["groupnorm_silu"]
    saved = {name: m.wrap_triton for name, m in modules.items()}
    saved_sms = gn._multiprocessors
    first = len(into)
    try:
        for m in modules.values():
            m.wrap_triton = wrap
        gn._multiprocessors = lambda device: H200_MULTIPROCESSORS
        yield
    finally:
        for name, m in modules.items():
            m.wrap_triton = saved[name]
        gn._multiprocessors = saved_sms
    # a kernel launched more than once here (attention's three backward GEMMs): number them
    mine = into[first:]
    for launch in mine:
        same = [other for other in mine if other.kernel is launch.kernel]
        if len(same) > 1:
            index = next(i for i, other in enumerate(same) if other is launch)
            launch.label += f" #{index + 1}/{len(same)}"


def _meta(shape, dtype, channels_last=False):
    import torch
    t = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        t = t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t


def groupnorm_launches(problems, dtypes, flags, into: list) -> None:
    import torch
    gn = _kernel_modules()["groupnorm_silu"]
    for (batch, chans, spatial, groups), nhwc, dtype, flag in itertools.product(
            problems, (False, True), dtypes, flags):
        act, has_shift, affine = GN_FLAGS[flag]
        side = math.isqrt(spatial)
        shape = (batch, chans, side, spatial // side)
        x = _meta(shape, _torch_dtype(dtype), nhwc)
        weight = _meta((chans,), torch.float32) if affine else None
        bias = _meta((chans,), torch.float32) if affine else None
        shift = _meta((batch, chans), _torch_dtype(dtype)) if has_shift else None
        for backward in (False, True):
            p = gn.plan(batch, chans, spatial, groups, nhwc, H200_MULTIPROCESSORS,
                        backward=backward)
            label = (f"{'bwd' if backward else 'fwd'} {p.strategy} {'nhwc' if nhwc else 'nchw'} "
                     f"{flag} {batch}x{chans}x{shape[2]}x{shape[3]} G{groups}")
            with _recording(into, "groupnorm_silu", dtype, label):
                if backward:
                    mean = _meta((batch, groups), torch.float32)
                    gn.backward(torch.empty_like(x), x, mean, torch.empty_like(mean), groups,
                                weight, bias, shift, act, shift_grad=has_shift,
                                affine_grad=affine)
                else:
                    gn.forward(x, groups, weight, bias, 1e-5, shift, act)


def _qkv_views(batch, length, width, dtype, nhwc):
    """q, k, v as the U-Net passes them: (B, 1, L, d) views of a (B, 3d, H, W) convolution output
    (sr3fast/model/layers.py), stride 1 along L for NCHW, along d for NHWC."""
    side = math.isqrt(length)
    assert side * side == length, "an image's H·W: give a square length"
    qkv = _meta((batch, 3 * width, side, length // side), dtype, nhwc)
    return qkv.flatten(2).transpose(1, 2).unsqueeze(1).split(width, dim=-1)


def attention_launches(shapes, dtypes, into: list, layouts=(False, True)) -> None:
    attn = _kernel_modules()["attention"]
    for (batch, length, width), nhwc, dtype in itertools.product(shapes, layouts, dtypes):
        q, k, v = _qkv_views(batch, length, width, _torch_dtype(dtype), nhwc)
        ragged = "ragged " if (batch, length, width) == ATTENTION_RAGGED else ""
        label = f"{ragged}B{batch} L{length} d{width} {'nhwc' if nhwc else 'nchw'}"
        with _recording(into, "attention", dtype, "fwd " + label):
            out, lse = attn.attention_forward(q, k, v, width ** -0.5)
        with _recording(into, "attention", dtype, "bwd " + label):
            attn.attention_backward(attn.empty_in_layout_of(q), q, k, v, out, lse, width ** -0.5)


def reverse_step_launches(dtypes, into: list) -> None:
    """Single-step (coefs (B, 5)), multistep (HAS_HISTORY: coefs (B, 6), x0_prev in y_t's dtype,
    as a sampling loop carries it) and three-step (HAS_HISTORY2: coefs (B, 7), x0_prev2 too)
    launches."""
    import torch
    rs = _kernel_modules()["reverse_step"]
    for dtype, noise, clip, history in itertools.product(dtypes, (False, True), (None, 1.0),
                                                         (0, 1, 2)):
        y = _meta((4, 3, 256, 256), _torch_dtype(dtype))
        coefs = _meta((4, 5 + history), torch.float32)
        label = (f"{'given noise' if noise else 'philox noise'} {'clip' if clip else 'no clip'}"
                 f"{('', ' history', ' history2')[history]}")
        with _recording(into, "reverse_step", dtype, label):
            rs.launch_reverse_step(y, torch.empty_like(y), coefs,
                                   torch.empty_like(y) if noise else None,
                                   None if noise else _meta((1,), torch.int64), clip,
                                   x0_prev=torch.empty_like(y) if history else None,
                                   x0_prev2=torch.empty_like(y) if history == 2 else None)


def quick_groupnorm_problems() -> list[tuple[int, int, int, int]]:
    """One SR3 problem per path and layout: split (batch 1), tile (16x512x16x16 NCHW; NHWC
    loops there), loop (batch 64 at 128x128, where the attention norm's backward failed to
    compile in Triton 3.6)."""
    return [(1, 64, 128 * 128, 32), (16, 512, 16 * 16, 32), (4, 128, 64 * 64, 32),
            (64, 128, 128 * 128, 32)]


def record_launches(scope: str, dtypes: Iterable[str] | None = None) -> list[Launch]:
    """The launches of `scope` (see the module doc), in `dtypes` if given."""
    launches: list[Launch] = []
    if scope == "quick":
        # groupnorm in fp32 only: the dtype whose dy loads feed its sums without a conversion,
        # the pattern that broke Triton 3.6; --all compiles every dtype
        gn_dtypes, other = tuple(dtypes or ("fp32",)), tuple(dtypes or ("fp32", "bf16"))
        groupnorm_launches(quick_groupnorm_problems(), gn_dtypes, ("resblock", "attn_norm"),
                           launches)
        attention_launches([ATTENTION_SHAPES[0], ATTENTION_RAGGED], other, launches,
                           layouts=(False,))
    else:
        gn_dtypes = other = tuple(dtypes or DTYPES)
        groupnorm_launches(sr3_groupnorm_problems(), gn_dtypes, tuple(GN_FLAGS), launches)
        attention_launches([*ATTENTION_SHAPES, ATTENTION_RAGGED], other, launches)
    reverse_step_launches(other, launches)
    return launches


# -------------------------------------------------------------------------------------------------
# Jobs: one per distinct compile
# -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    name: str              # kernel name
    family: str
    config: str            # the config as a short string ("-" for a kernel that is not autotuned)
    dtype: str
    label: str             # the first variant that needs this compile
    variants: int          # how many recorded launches need it
    kept: bool             # whether the autotuner may run it at one of those launches
    jit: Any
    args: tuple
    kwargs: dict


def config_name(config) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks + ' ' if blocks else ''}w{config.num_warps} s{config.num_stages}"


def _gpu_configs(launch: Launch) -> list:
    """The configs of an autotuned kernel that a GPU may run: attention also lists the CPU
    interpreter's own configs, which a GPU never runs."""
    configs = list(launch.kernel.configs)
    attn = _kernel_modules()["attention"]
    interpreter_only = getattr(attn, "_INTERPRETER_CONFIGS", {}).values()
    return [c for c in configs if not any(c is i for i in interpreter_only)]


def _kept(launch: Launch) -> list:
    """The configs the autotuner's prune rule keeps at this launch (on a GPU, unpinned)."""
    kernel = launch.kernel  # as Autotuner.prune_configs calls it
    if kernel.early_config_prune is None:
        return list(kernel.configs)
    named = dict(zip(kernel.arg_names, launch.args))
    return list(kernel.early_config_prune(kernel.configs, named, **launch.kwargs))


_BINDERS: dict = {}


def _target(arch: int):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


def _bind(jit, args, kwargs, arch: int):
    """What JITFunction.run does before compiling, for a CUDA target instead of the current
    device: (ASTSource, options, cache key)."""
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    if (id(jit), arch) not in _BINDERS:
        backend = make_backend(_target(arch))
        _BINDERS[id(jit), arch] = backend, create_function_from_signature(jit.signature,
                                                                          jit.params, backend)
    backend, binder = _BINDERS[id(jit), arch]
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    key = (jit.fn.__qualname__, repr(specialization), repr(sorted(options.items())))
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound,
                                                           specialization, options)
    return ASTSource(jit, signature, constexprs, attrs), options, key


def _untyped(key: tuple) -> tuple:
    """A compile key with element types removed: the same geometry in another dtype."""
    return (key[0], re.sub(r"'\*\w+'", "'*'", key[1]), key[2])


def _structure(job: Job) -> tuple:
    """What --all groups groupnorm_silu compiles by: kernel, config, dtype, the boolean (and
    absent-pointer) constexprs and the tile; not the groups per block or which integer arguments
    are multiples of 16."""
    flags = tuple(sorted((k, v) for k, v in job.kwargs.items() if isinstance(v, bool)))
    absent = tuple(i for i, a in enumerate(job.args) if a is None)
    return (job.name, job.config, job.dtype, flags, absent, job.kwargs.get("BLOCK_C"),
            job.kwargs.get("BLOCK_S"))


def make_jobs(launches: list[Launch], arch: int, scope: str = "all",
              kernel_filter: str | None = None) -> list[Job]:
    """The distinct compiles the recorded launches need under `scope` (see the module doc)."""
    from triton.runtime.autotuner import Autotuner
    pending = []
    kept_where: dict = {}   # (kernel, id(config)) -> untyped keys of the launches that keep it
    for launch in launches:
        autotuned = isinstance(launch.kernel, Autotuner)
        jit = launch.kernel.fn if autotuned else launch.kernel
        name = jit.fn.__name__
        if kernel_filter and not re.search(kernel_filter, name):
            continue
        kept = _kept(launch) if autotuned else [None]
        if scope == "quick":
            configs = kept[:1]  # what a pinned autotuner runs
        else:
            configs = _gpu_configs(launch) if autotuned else [None]
        for config in configs:
            kwargs = dict(launch.kwargs)
            if config is not None:
                kwargs.update(config.all_kwargs())
            _, _, key = _bind(jit, launch.args, kwargs, arch)
            is_kept = any(config is c for c in kept)
            if is_kept:
                kept_where.setdefault((name, id(config)), set()).add(_untyped(key))
            pending.append((key, launch, jit, name, config, kwargs, is_kept))
    jobs: dict = {}
    for key, launch, jit, name, config, kwargs, is_kept in pending:
        where = kept_where.get((name, id(config)))
        # compile a config where some dtype keeps it, or (kept nowhere) everywhere
        if config is not None and where is not None and _untyped(key) not in where:
            continue
        job = jobs.get(key)
        if job is None:
            jobs[key] = Job(name, launch.family, config_name(config) if config else "-",
                            launch.dtype, launch.label, 1, is_kept, jit, launch.args, kwargs)
        else:
            job.variants += 1
            job.kept = job.kept or is_kept
    if scope != "all":
        return list(jobs.values())
    grouped: dict = {}
    for job in jobs.values():
        if job.family != "groupnorm_silu":
            grouped[id(job)] = job
            continue
        group = _structure(job)
        best = grouped.get(group)
        if best is None:
            grouped[group] = job
            continue
        # the representative: the most groups per block (the widest membership matrix)
        keep, other = ((job, best) if job.kwargs.get("BLOCK_G", 0) > best.kwargs.get("BLOCK_G", 0)
                       else (best, job))
        keep.variants += other.variants
        keep.kept = keep.kept or other.kept
        grouped[group] = keep
    return list(grouped.values())


# -------------------------------------------------------------------------------------------------
# Compiling
# -------------------------------------------------------------------------------------------------

_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")


def _first_error_line(exc: BaseException, native_log: str) -> str:
    """The exception's first line, preceded by the compiler's own diagnosis when it printed one
    (an MLIR assertion or error, a ptxas error) to the native stderr."""
    message = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    for line in native_log.splitlines():
        line = line.strip()
        assertion = re.search(r"([\w.]+\.(?:cpp|h)):(\d+):.*(Assertion .*)", line)
        if assertion:
            return f"{assertion.group(1)}:{assertion.group(2)}: {assertion.group(3)} ({message})"
        if " error:" in line or line.startswith("ptxas fatal"):
            return f"{line[:200]} ({message})"
    return message


def compile_job(job: Job, arch: int) -> dict:
    """Compile one job in this process; its result as a dict."""
    import triton
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    src, options, _ = _bind(job.jit, job.args, job.kwargs, arch)
    stdout = io.StringIO()
    native = tempfile.TemporaryFile(mode="w+b")
    sys.stderr.flush()
    saved_fd = os.dup(2)
    os.dup2(native.fileno(), 2)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(stdout):
            compiled = triton.compile(src, target=_target(arch), options=options.__dict__)
        error = None
    except Exception as exc:  # a compiler failure is a result, not a crash of the check
        compiled, error = None, exc
    finally:
        seconds = time.perf_counter() - start
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        native.seek(0)
        native_log = native.read().decode(errors="replace")
        native.close()
    result = {"seconds": round(seconds, 2), "status": "ok", "error": "", "regs": None,
              "spills": None, "spill_stores": None, "spill_loads": None, "smem": None}
    if error is not None:
        result.update(status="failed", error=_first_error_line(error, native_log))
        return result
    log = stdout.getvalue()
    regs, frame = _PTXAS_REGISTERS.search(log), _PTXAS_FRAME.search(log)
    result["smem"] = compiled.metadata.shared
    if regs:
        result["regs"] = int(regs.group(1))
    if frame:
        result.update(spills=int(frame.group(1)) // 4, spill_stores=int(frame.group(2)),
                      spill_loads=int(frame.group(3)))
    return result


def _worker(jobs, arch, tasks, results, slot, current, started):
    """Compile the jobs whose indices arrive on `tasks`. current[slot] and started[slot] say, in
    shared memory, which job this process is compiling and since when: a process that aborts
    cannot be relied on to have sent a message first."""
    sys.stdout = open(os.devnull, "w")  # stray prints of the compiler (reproducers)
    while True:
        try:
            index = tasks.get(timeout=1)
        except queue.Empty:
            continue
        if index is None:
            return
        started[slot] = time.monotonic()
        current[slot] = index
        try:
            result = compile_job(jobs[index], arch)
        except Exception as exc:  # a bug of this check, reported per compile
            result = {"seconds": 0.0, "status": "failed", "error": f"check error: {exc!r}",
                      "regs": None, "spills": None, "spill_stores": None, "spill_loads": None,
                      "smem": None}
        results.put((index, result))
        current[slot] = -1


def run_jobs(jobs: list[Job], arch: int, processes: int, timeout: float,
             progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Compile every job in `processes` forked processes. A process that dies (a compiler abort)
    or overruns `timeout` seconds on one compile has that compile reported as failed and is
    replaced."""
    ctx = multiprocessing.get_context("fork")
    tasks, results = ctx.Queue(), ctx.Queue()
    for index in sorted(range(len(jobs)), key=lambda i: jobs[i].family != "attention"):
        tasks.put(index)
    processes = max(1, min(processes, len(jobs)))
    current = ctx.Array("l", [-1] * processes, lock=False)
    started = ctx.Array("d", [0.0] * processes, lock=False)
    workers: dict = {}   # slot -> process

    def spawn(slot):
        current[slot] = -1
        p = ctx.Process(target=_worker, daemon=True,
                        args=(jobs, arch, tasks, results, slot, current, started))
        p.start()
        workers[slot] = p

    for slot in range(processes):
        spawn(slot)
    out: list = [None] * len(jobs)
    done = 0

    def record(index, result):
        nonlocal done
        if out[index] is None:
            out[index] = result
            done += 1
            if progress:
                progress(done, len(jobs))

    while done < len(jobs):
        try:
            record(*results.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        for slot, p in list(workers.items()):
            index = current[slot]
            overran = index >= 0 and time.monotonic() - started[slot] > timeout
            if p.is_alive() and not overran:
                continue
            if overran:
                p.kill()
            p.join()
            while True:  # what it finished before it died
                try:
                    record(*results.get_nowait())
                except queue.Empty:
                    break
            if index >= 0 and out[index] is None:
                reason = (f"timed out after {timeout:g} s" if overran
                          else f"compiler process died (exit code {p.exitcode})")
                record(index, {"seconds": round(time.monotonic() - started[slot], 2),
                               "status": "failed", "error": reason, "regs": None,
                               "spills": None, "spill_stores": None, "spill_loads": None,
                               "smem": None})
            del workers[slot]
            if done < len(jobs):
                spawn(slot)
    for _ in workers:
        tasks.put(None)
    for p in workers.values():
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    return out


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

def rows(jobs: list[Job], results: list[dict]) -> list[dict]:
    table = []
    for job, result in zip(jobs, results):
        variant = job.label + (f" (+{job.variants - 1})" if job.variants > 1 else "")
        table.append({"kernel": job.name, "family": job.family, "config": job.config,
                      "dtype": job.dtype, "variant": variant, "kept": job.kept, **result})
    table.sort(key=lambda r: (r["family"], r["kernel"], r["config"], r["dtype"], r["variant"]))
    return table


def problems(table: list[dict]) -> list[str]:
    """Why the check fails: compile failures, and spills in configs the autotuner may keep."""
    found = []
    for r in table:
        where = f"{r['kernel']} [{r['config']}] {r['dtype']} {r['variant']}"
        if r["status"] != "ok":
            found.append(f"{where}: {r['error']}")
        elif r["regs"] is None or r["spills"] is None:
            found.append(f"{where}: no ptxas report of registers and spills found (has its -v "
                         "output changed?)")
        elif r["kept"] and r["spills"]:
            found.append(f"{where}: spills {r['spills']} words ({r['regs']} registers), and the "
                         "autotuner may keep this config")
    return found


def format_table(table: list[dict]) -> str:
    head = ("kernel", "config", "dtype", "variant", "kept", "regs", "spills", "smem", "s",
            "status")
    lines = [head]
    for r in table:
        lines.append((r["kernel"], r["config"], r["dtype"], r["variant"],
                      "yes" if r["kept"] else "no",
                      "" if r["regs"] is None else str(r["regs"]),
                      "" if r["spills"] is None else str(r["spills"]),
                      "" if r["smem"] is None else str(r["smem"]),
                      f"{r['seconds']:.1f}",
                      "ok" if r["status"] == "ok" else f"FAILED: {r['error']}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join(" | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " | " + line[-1]
                     for line in lines)


def can_target_cuda(arch: int = 90, interpreter_matters: bool = True) -> str | None:
    """None when the installed Triton can compile for CUDA sm_`arch` here, else why not.
    interpreter_matters=False: leave TRITON_INTERPRET out of it (for a caller that runs the
    check in a process without it)."""
    if interpreter_matters and os.environ.get("TRITON_INTERPRET") == "1":
        return ("TRITON_INTERPRET=1 makes @triton.jit kernels interpreted functions, which do not "
                "compile; run without it")
    try:
        import triton
        from triton.compiler.compiler import make_backend
        backend = make_backend(_target(arch))
        from triton import knobs
        ptxas = knobs.nvidia.ptxas.path
    except Exception as exc:
        return f"Triton cannot target CUDA here: {type(exc).__name__}: {exc}"
    if not ptxas or not os.path.exists(ptxas):
        return f"Triton {triton.__version__} has no ptxas ({ptxas!r})"
    del backend
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sr3fast.kernels.compile_check",
                                     description=__doc__.split("\n\n")[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--all", action="store_true", help="every config and variant (default)")
    scope.add_argument("--exhaustive", action="store_true",
                       help="as --all, without grouping groupnorm_silu's compiles")
    scope.add_argument("--quick", action="store_true",
                       help="the pinned configs at a few variants (tests/test_triton_compile.py)")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kernel", help="only kernels whose name matches this regex")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, help="only these dtypes")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per compile")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--list", action="store_true", help="list the compiles, run none")
    args = parser.parse_args(argv)

    reason = can_target_cuda(args.arch)
    if reason:
        print(f"compile_check: {reason}", file=sys.stderr)
        return 2
    os.environ.pop("SR3FAST_TRITON_AUTOTUNE", None)  # the prune rules as on a GPU, unpinned
    import triton
    scope = "quick" if args.quick else "exhaustive" if args.exhaustive else "all"
    started = time.perf_counter()
    launches = record_launches(scope, args.dtype)
    jobs = make_jobs(launches, args.arch, scope, args.kernel)
    print(f"Triton {triton.__version__}, sm_{args.arch}, {scope}: {len(launches)} launches "
          f"recorded, {len(jobs)} compiles, {args.jobs} processes", file=sys.stderr)
    if args.list:
        for job in jobs:
            print(f"{job.name} [{job.config}] {job.dtype} {job.label} kept={job.kept}")
        return 0
    cache = tempfile.mkdtemp(prefix="sr3fast-compile-check-")
    os.environ["TRITON_CACHE_DIR"] = cache  # nothing of this run in the user's cache
    try:
        def progress(done, total):
            if sys.stderr.isatty() or done == total or done % 50 == 0:
                print(f"\r{done}/{total} compiled", end="", file=sys.stderr, flush=True)
        results = run_jobs(jobs, args.arch, args.jobs, args.timeout, progress)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(file=sys.stderr)
    table = rows(jobs, results)
    print(format_table(table))
    found = problems(table)
    wall = time.perf_counter() - started
    failed = sum(r["status"] != "ok" for r in table)
    print(f"\n{len(table)} compiles in {wall:.0f} s ({sum(r['seconds'] for r in table):.0f} s of "
          f"compiling): {failed} failed, "
          f"{sum(bool(r['spills']) for r in table if r['status'] == 'ok')} spill "
          f"({sum(bool(r['spills']) and r['kept'] for r in table if r['status'] == 'ok')} "
          "of them in kept configs)")
    for line in found:
        print(f"PROBLEM {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch,
                       "scope": scope, "wall_seconds": round(wall, 1),
                       "results": table, "problems": found}, f, indent=1)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
