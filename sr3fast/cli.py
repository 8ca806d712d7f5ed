"""The `sr3fast` command line (also `python -m sr3fast`).

Kept light: parsing, --help, --version and `presets` import no torch; a command that needs it
imports it when it runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__

# One exit-status scheme for every command.
EXIT_OK = 0        # everything asked for was done
EXIT_FAILED = 1    # some inputs failed while running; the others were written
EXIT_USAGE = 2     # nothing was run: bad arguments, inputs, model or device
EXIT_STATUS_EPILOG = """\
exit status:
  0  everything asked for was done
  1  some inputs failed while running (unreadable image, out of memory, a result with NaN or
     Inf values): each is reported, the others were written
  2  nothing was run: bad arguments, a missing input or output folder, a model that cannot be
     loaded, an unknown or unavailable device
"""

DTYPES = ("float32", "bfloat16", "float16")

UPSCALE_EPILOG = """\
several processes or GPUs:
  torchrun --standalone --nproc_per_node N -m sr3fast upscale DIR -o OUT [options]
  splits the sorted inputs between the N processes (each output written by exactly one, the same
  images whatever N is, given --seed); the first process shows the progress and every failure.

"""


class UsageError(Exception):
    """Something the user asked for cannot be done as given; the message says what to change.
    Raised before anything is written; the command exits with EXIT_USAGE."""


def _collect_inputs(paths: list[str], output: str):
    """The jobs of `sr3fast upscale PATHS -o OUTPUT` (sr3fast.folders.plan: folders searched
    recursively, their tree mirrored under OUTPUT), any problem with them as a UsageError."""
    from .folders import plan

    try:
        return plan(paths, output)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def _device(name: str | None, launch=None):
    """The torch.device --device names (auto, cpu, cuda, cuda:N; under torchrun 'auto' and 'cuda'
    mean this process's GPU), checked to exist on this machine (None stays None)."""
    if name is None:
        return None
    from .distributed_upscale import Launch, device_for

    try:
        return device_for(name, launch if launch is not None else Launch())
    except ValueError as err:
        raise UsageError(str(err)) from None


def _dtype(name: str | None, device):
    """The precision to run in: --dtype, else float32 on the CPU (half precision is slow there,
    when it runs at all) and the checkpoint's own elsewhere (None)."""
    import torch

    if name is not None:
        return getattr(torch, name)
    return torch.float32 if device is None or device.type == "cpu" else None


def _load_model(name: str, **options):
    """api.load(name, **options), with any failure as a UsageError that says what to pass."""
    from . import api

    try:
        return api.load(name, **options)
    except Exception as err:
        what = "the default model (no --model given)" if name == api.DEFAULT_MODEL else f"model {name!r}"
        reason = str(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {err}"
        raise UsageError(f"cannot load {what}: {reason}. Pass --model with an sr3fast checkpoint, the "
                         "--out folder of `sr3fast train`, or a preset name (`sr3fast presets` lists "
                         "them)") from None


def _out_of_memory(err: BaseException) -> bool:
    import torch

    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def _upscale_failure(err: BaseException, source: Path, device) -> str | None:
    """What to tell the user when upscaling `source` failed in a way that concerns this input
    only; None for anything else (a bug: its traceback is worth seeing)."""
    if _out_of_memory(err):
        where = device if device is not None else "cpu"
        return (f"out of memory upscaling {str(source)!r} on {where}: use a smaller image (or crop it "
                "into pieces), or a device with more memory")
    if isinstance(err, (ValueError, FloatingPointError, OSError, MemoryError)):
        return f"cannot upscale {str(source)!r}: {err}"
    return None


# Images of one size per model call when --batch-size is not given: batching pays on a GPU; on
# the CPU the U-Net's work grows with the batch and nothing is gained but memory use.
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 4}


def cmd_upscale(args) -> int:
    """Upscale every input, one process's share of them under torchrun (sr3fast.folders plans
    the run, sr3fast.distributed_upscale places the processes): failures are collected and
    reported together at the end, on the first process; outputs are written atomically."""
    from . import api
    from .distributed_upscale import Launch, Report, gather_reports
    from tqdm.auto import tqdm

    from .folders import job_seeds, shard
    from .model import presets

    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        launch = Launch.from_environment()
    except ValueError as err:
        raise UsageError(str(err)) from None
    if launch.distributed and args.seed is None and args.model in presets():
        raise UsageError(f"--model {args.model} is a preset: without --seed each of the {launch.world_size} "
                         "processes would draw its own random weights; pass --seed")
    jobs = _collect_inputs(args.inputs, args.output)
    device = _device(args.device, launch)
    model = _load_model(args.model, config=args.config, device=device, dtype=_dtype(args.dtype, device),
                        seed=args.seed)
    try:       # the checks upscale makes, before anything is written
        api._settings(model, args.sampler, args.steps, None, args.eta, args.start_gamma)
        api._back_projections(model, args.back_projections)
        _check_tiling(model, args)
    except ValueError as err:
        raise UsageError(str(err)) from None

    seeds = job_seeds(jobs, args.seed)               # from the whole run: independent of the shard
    mine = shard(jobs, launch.rank, launch.world_size)
    report = Report()
    if args.skip_existing:
        todo = [job for job in mine if not job.target.exists()]
        report.skipped = len(mine) - len(todo)
    else:
        todo = mine
    batch_size = args.batch_size or (1 if args.package else DEFAULT_BATCH_SIZE.get(device.type, 1))
    # A bar over images when there are several (on the first process only: N bars on one terminal
    # are unreadable), else upscale's own bar over the sampling steps of the one image.
    images_bar = not args.quiet and len(jobs) > 1 and launch.rank == 0
    options = dict(model=model, steps=args.steps, sampler=args.sampler, eta=args.eta,
                   start_gamma=args.start_gamma, back_projections=args.back_projections,
                   progress=not args.quiet and len(jobs) == 1, loop=args.loop, package=args.package,
                   tile=args.tile, tile_overlap=args.tile_overlap, max_memory=args.max_memory,
                   scale=args.scale)
    with tqdm(total=len(todo), unit="image", desc=_bar_title(launch), disable=not images_bar,
              dynamic_ncols=True) as bar:
        say = tqdm.write if images_bar else print
        for job, outcome in _run_jobs(todo, seeds, batch_size, options, device):
            if isinstance(outcome, str):
                report.failures.append((str(job.source), outcome))
                bar.set_postfix(failed=len(report.failures))
            else:
                report.written += 1
                say(f"{job.source} -> {job.target} ({outcome.width}x{outcome.height})")
            bar.update(1)

    # Flushed before the gather: once the first process exits with 1, torchrun stops the others,
    # and a stopped process loses what its buffers held.
    sys.stdout.flush()
    sys.stderr.flush()
    total = gather_reports(report, launch)
    if launch.rank == 0:
        _print_summary(total, len(jobs), args.skip_existing)
    return EXIT_FAILED if total.failures else EXIT_OK


def _check_tiling(model, args) -> None:
    """The tiling and --scale checks upscale makes per image, made once before any is read."""
    from .cascades import repeated
    from .tiling import default_overlap, tile_plan

    if args.scale is not None:
        repeated(model, args.scale)
    if args.tile is False and (args.tile_overlap is not None or args.max_memory is not None):
        raise ValueError("--tile off samples untiled; drop --tile-overlap and --max-memory")
    if args.tile:
        overlap = default_overlap(args.tile) if args.tile_overlap is None else args.tile_overlap
        tile_plan(args.tile, args.tile, args.tile, overlap, model.size_multiple)
    elif args.tile_overlap is not None and args.tile_overlap < 0:
        raise ValueError(f"--tile-overlap must be at least 0, got {args.tile_overlap}")


def _bar_title(launch) -> str:
    return f"upscale, process 0 of {launch.world_size}" if launch.distributed else "upscale"


def _run_jobs(jobs, seeds, batch_size: int, options: dict, device):
    """(job, PIL image written to job.target, or the message saying why not) for every job.

    Batches: api.upscale draws all its noise from one generator per call (seed=), so the images
    of a batch cannot each be sampled from their own seed; and a batch's noise is not any one
    image's noise alone. With seeds (--seed), each image therefore goes through upscale alone,
    which keeps every output a function of its own seed only (independent of the batch size and
    of the number of processes); same-size batches are formed for unseeded runs, whose images
    are random anyway. A batch that fails is retried one image at a time, so that one image too
    large for memory, or one bad result, fails alone."""
    from .folders import image_size, same_size_batches

    if batch_size == 1 or any(seeds[job] is not None for job in jobs):
        groups = ([job] for job in jobs)
    else:
        sizes = {}
        for job in jobs:
            try:
                sizes[job] = image_size(job.source)
            except ValueError as err:
                yield job, str(err)
        groups = same_size_batches([job for job in jobs if job in sizes], batch_size, sizes)
    for group in groups:
        yield from _run_group(group, seeds, options, device)


def _run_group(group, seeds, options: dict, device):
    """_run_jobs for one group of same-size images: one api.upscale call for the group when it
    is unseeded, else (or when that call fails) one call per image."""
    import torch

    from . import api
    from .images import read_image, to_unit_batch

    inputs = {}
    for job in group:
        try:
            inputs[job] = to_unit_batch(read_image(job.source))[0]
        except (ValueError, OSError) as err:
            yield job, _upscale_failure(err, job.source, device)
    ready = list(inputs)
    if len(ready) > 1:
        try:
            results = api.upscale(torch.cat([inputs[job] for job in ready]), seed=None, **options)
        except Exception as err:
            if _upscale_failure(err, ready[0].source, device) is None:
                raise                           # a bug, not a property of these images
            results = None                      # retried one by one below, outside this frame
        if results is not None:
            for job, result in zip(ready, results):
                yield job, _write(job, result[None], device)
            return
    for job in ready:
        try:
            result = api.upscale(inputs[job], seed=seeds[job], **options)
        except Exception as err:
            message = _upscale_failure(err, job.source, device)
            if message is None:
                raise
            yield job, message
            continue
        yield job, _write(job, result, device)


def _write(job, result, device):
    """Write the (1, 3, H, W) result in [0, 1] to job.target as an 8-bit image, atomically,
    making its folder when needed; the PIL image written, or the message saying why not."""
    from .images import InputKind, from_unit_batch, save_image_atomic

    image = from_unit_batch(result, InputKind("pil"))
    try:
        job.target.parent.mkdir(parents=True, exist_ok=True)
        save_image_atomic(image, job.target)
    except OSError as err:
        return f"cannot write {str(job.target)!r} (the result of {str(job.source)!r}): {err}"
    return image


def _print_summary(report, inputs: int, skip_existing: bool) -> None:
    """The whole run's outcome: counts when there were several inputs, and every failure."""
    if inputs > 1:
        skipped = f", {report.skipped} skipped (output exists)" if skip_existing else ""
        print(f"sr3fast upscale: {report.written} of {inputs} written{skipped}, "
              f"{len(report.failures)} failed")
    if report.failures and inputs > 1:
        print(f"sr3fast upscale: {len(report.failures)} of {inputs} inputs failed:", file=sys.stderr)
    for _, message in report.failures:
        print(f"sr3fast upscale: error: {message}", file=sys.stderr)


def cmd_eval(args) -> int:
    from . import api
    from .evaluation import check_output_path, evaluate_images, find_images, write_outputs

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.json:
        check_output_path(args.json)
    if args.grid:
        check_output_path(args.grid, image=True)
    paths = find_images(args.inputs)
    name = args.model if args.model is not None else api.DEFAULT_MODEL
    model = _load_model(name, device=_device(args.device))
    report = evaluate_images(model, paths, steps=args.steps, sampler=args.sampler, seed=args.seed,
                             progress=not args.quiet, keep_images=bool(args.grid), model_name=name,
                             start_gamma=args.start_gamma, back_projections=args.back_projections)
    print(report.table())
    try:
        written = write_outputs(report, json_path=args.json, grid_path=args.grid)
    except OSError as err:
        raise ValueError(f"cannot write the results ({err}); nothing was written") from None
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_tune_schedule(args) -> int:
    from . import api
    from .evaluation import check_output_path
    import json

    from .schedule_search import TuneReport, parse_steps, tune_schedule, write_report_json

    steps = parse_steps(args.steps)
    grid = _grid(args.grid)
    if args.rounds < 0:
        raise UsageError(f"--rounds must be 0 or more, got {args.rounds}")
    if (args.data is None) == (args.from_json is None):
        raise UsageError("give --data (held-out images to search on) or --from-json (an earlier search's "
                         "results), one of them")
    if args.data is not None and not Path(args.data).exists():
        raise UsageError(f"--data {args.data!r} does not exist")
    if args.from_json is not None and not Path(args.from_json).is_file():
        raise UsageError(f"--from-json {args.from_json!r} is not a file")
    if args.output is None and not args.in_place:
        raise UsageError("say where the tuned model goes: -o OUT.safetensors, or --in-place")
    target = Path(args.model if args.in_place else args.output)
    if args.in_place and not target.is_file():
        raise UsageError(f"--in-place rewrites a checkpoint file; {args.model!r} is not one "
                         "(for a preset or the built-in model, write a copy with -o)")
    check_output_path(target)
    if args.json:
        check_output_path(args.json)
    model = _load_model(args.model, device=_device(args.device))
    if args.from_json is not None:
        try:
            report = TuneReport.from_dict(json.loads(Path(args.from_json).read_text()), args.guard, args.slack)
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"--from-json {args.from_json!r} is not the --json of `sr3fast tune-schedule` "
                             f"({type(err).__name__}: {err})") from None
    else:
        report = tune_schedule(model, [args.data], steps, sampler=args.sampler, crop=args.crop,
                               crops_per_image=args.crops_per_image, seed=args.seed,
                               guard=0.9 if args.guard is None else args.guard, points=grid, rounds=args.rounds, slack=args.slack, baseline=args.baseline,
                               progress=not args.quiet)
    print(report.table())
    if args.json:
        print(f"wrote {write_report_json(report, args.json)}")
    try:
        settings = report.settings(api._back_projections(model, None), args.choose)
    except ValueError as err:
        raise UsageError(f"--choose: {err}") from None
    if settings is None:
        print(f"sr3fast tune-schedule: no candidate kept {report.guard} of the baseline's sharpness"
              f"{f' at {args.choose} steps' if args.choose else ''}; nothing was written (try a lower "
              "--guard or other --steps)", file=sys.stderr)
        return EXIT_FAILED
    model.inference_settings = settings
    written = api.save(model, target, dtype=_stored_dtype(args.model))
    print(f"wrote {written} (settings: {settings.sampler}, {settings.steps} steps, lambda_end "
          f"{settings.schedule['lambda_end']:.3f}, rho {settings.schedule['rho']:.2f})")
    return EXIT_OK


def _stored_dtype(name: str):
    """The floating-point dtype the checkpoint `name` stores its weights in (so a tuned copy of the
    fp16 default model stays fp16), or None for presets and folders (keep the model's)."""
    from safetensors import safe_open

    from . import api

    path = api.DEFAULT_WEIGHTS if name == api.DEFAULT_MODEL else Path(name)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_slice(key)
            dtype = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(tensor.get_dtype())
            if dtype is not None:
                import torch
                return getattr(torch, dtype)
    return None


def _grid(text: str) -> tuple[int, int]:
    try:
        points = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        points = ()
    if len(points) != 2 or min(points) < 1:
        raise UsageError(f"--grid takes the grid points of lambda_end and rho as AxB (e.g. 4x3), got {text!r}")
    return points


def cmd_convert(args) -> int:
    import sr3fast

    model = sr3fast.load(args.checkpoint, config=args.config)
    path = sr3fast.save(model, args.output)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({params:,} parameters, {model.config.low_res}->{model.config.high_res})")
    return 0


def _tile(text: str):
    """--tile: 'auto' (None: from the memory budget), 'off' (False) or a side in output pixels."""
    if text.lower() in ("auto", "off"):
        return None if text.lower() == "auto" else False
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--tile must be auto, off or a tile side in output pixels, got {text!r}")
    return value


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def _bytes(text: str) -> int:
    """--max-memory: bytes, with an optional unit: 800MiB, 4G (GiB), 4GB (10^9), 1.5GiB."""
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--max-memory must be a size such as 4GiB, 800MiB or a number of "
                                         f"bytes, got {text!r}")
    return int(value)


def _size(text: str) -> tuple[int, int]:
    """'128' or '128x96' (height x width)."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"size must be N or HxW in pixels, got {text!r}")
    return values * 2 if len(values) == 1 else values



def cmd_export(args) -> int:
    import time

    import torch

    import sr3fast
    from .export import export

    device = _device(args.device)
    model = _load_model(args.model, config=args.config)
    started = time.perf_counter()
    with sr3fast.backend(args.backend):
        path = export(model, args.output, batch=args.batch, size=args.size, device=device,
                      dtype=getattr(torch, args.dtype) if args.dtype else None)
    size = f"{path.stat().st_size / 2**20:.1f} MiB"
    print(f"wrote {path} ({size}, compiled in {time.perf_counter() - started:.0f} s)")
    return 0


def cmd_presets(args) -> int:
    from .model import presets

    for name, config in presets().items():
        print(f"{name:16s} {config.low_res:>4d}->{config.high_res:<5d} {config.description}")
    return 0


def cmd_backends(args) -> int:
    import sr3fast

    print(sr3fast.explain_backend(args.device))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr3fast", description="Fast SR3 diffusion super-resolution",
                                     epilog=EXIT_STATUS_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sr3fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("upscale", help="super-resolve images", epilog=UPSCALE_EPILOG + EXIT_STATUS_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("inputs", nargs="+",
                    help="image files, or folders of images (searched recursively; hidden names skipped)")
    up.add_argument("-o", "--output", required=True,
                    help="output image (one input) or folder: <name>.png per input, a folder's "
                         "subfolders mirrored below it")
    up.add_argument("--model", default="default",
                    help="sr3fast checkpoint, public *_gen.pth (with --config) or preset name "
                         "(default: the built-in 4x model, docs/model-card.md)")
    up.add_argument("--config", help="JSON config of a public SR3 checkpoint")
    up.add_argument("--steps", type=int, default=None,
                    help="sampling steps (default: the model's recommended, else 100)")
    up.add_argument("--sampler", choices=("posterior", "sr3", "ddim", "dpmpp_2m", "dpmpp_2m_sde",
                                          "dpmpp_3m", "dpmpp_3m_sde"),
                    default=None,
                    help="default: the model's recommended, else posterior for public checkpoints, "
                         "sr3 for paper models. dpmpp_2m / dpmpp_2m_sde: DPM-Solver++(2M) and its SDE "
                         "form, for few steps (10-25); dpmpp_3m / dpmpp_3m_sde: the third-order 3M")
    up.add_argument("--eta", type=float, default=None,
                    help="noise scale of --sampler ddim (default 0: deterministic), dpmpp_2m_sde or "
                         "dpmpp_3m_sde (default 1: the SDE); 1 is the posterior variance")
    up.add_argument("--start-gamma", type=float, default=None, metavar="G",
                    help="start from the input noised to level G in [0, 1) instead of pure noise "
                         "(default: the model's recommended; 0: pure noise)")
    up.add_argument("--back-projections", type=int, default=None, metavar="N",
                    help="back-projection steps toward the input after sampling (default: the model's "
                         "recommended; 0: off)")
    up.add_argument("--seed", type=int, default=None,
                    help="seed for reproducible samples: one image file gets SEED itself; in a run of "
                         "several, each image gets a seed made from SEED and its path below the folder "
                         "named (sr3fast.folders.file_seed), so its result does not depend on the other "
                         "images, --batch-size or the number of processes; with a preset name as "
                         "--model, also the seed of its random weights")
    up.add_argument("--device", default="auto",
                    help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:N; under torchrun "
                         "auto and cuda give each process the GPU of its LOCAL_RANK")
    up.add_argument("--dtype", choices=DTYPES, default=None,
                    help="precision of the weights and sampling (default: float32 on cpu, the "
                         "checkpoint's elsewhere); a --package needs the dtype it was exported with")
    up.add_argument("--loop", choices=("python", "cpp", "graph"), default="python",
                    help="where the sampling steps run: python, cpp (C++), graph (CUDA graph)")
    up.add_argument("--package", help="the U-Net compiled by `sr3fast export` for these images' size")
    up.add_argument("--batch-size", type=int, default=None, metavar="N",
                    help="images of the same size sampled together, without --seed only (with --seed "
                         "each image is sampled alone from its own seed); default: 1 on cpu or with "
                         f"--package, {DEFAULT_BATCH_SIZE['cuda']} on cuda")
    up.add_argument("--tile", type=_tile, default=None, metavar="auto|off|N",
                    help="sample on overlapping N-pixel tiles (output pixels), their noise predictions "
                         "blended before one reverse step, so no seam forms; auto (default): tile only "
                         "when the image does not fit --max-memory; off: never")
    up.add_argument("--tile-overlap", type=int, default=None, metavar="N",
                    help="pixels neighbouring tiles share (default: a quarter of the tile)")
    up.add_argument("--max-memory", type=_bytes, default=None, metavar="SIZE",
                    help="memory sampling may use, e.g. 4GiB (default: what the device has free); "
                         "picks the tile under --tile auto")
    up.add_argument("--scale", type=int, default=None,
                    help="overall factor, a power of the model's (16 with the 4x model: 4x twice, "
                         "each stage from its own seed)")
    up.add_argument("--skip-existing", action="store_true",
                    help="leave inputs whose output exists alone (to resume an interrupted run)")
    up.add_argument("-q", "--quiet", action="store_true",
                    help="no progress bar (over images, or over the sampling steps of a single image)")
    up.set_defaults(run=cmd_upscale)

    ex = commands.add_parser("export", help="compile the U-Net ahead of time (AOTInductor .pt2 package)",
                             description="Compile MODEL's denoiser for one input shape into a .pt2 "
                             "package: for `upscale --loop cpp --package`, and for C++ programs "
                             "(sr3fast_sample, built by CMakeLists.txt).")
    ex.add_argument("model", help="sr3fast checkpoint, public *_gen.pth (with --config) or preset name")
    ex.add_argument("--config", help="JSON config of a public SR3 checkpoint")
    ex.add_argument("-o", "--output", required=True, help="the .pt2 package to write")
    ex.add_argument("--size", type=_size, default=None,
                    help="output image size, N or HxW (default: the model's high resolution)")
    ex.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    ex.add_argument("--device", default="cpu", help="device the package runs on (default cpu)")
    ex.add_argument("--dtype", choices=DTYPES, default=None, help="default: the checkpoint's")
    ex.add_argument("--backend", default="auto",
                    help="sr3fast backend whose ops are compiled in (default auto)")
    ex.set_defaults(run=cmd_export)

    ev = commands.add_parser(
        "eval", help="measure a model against ground-truth images (PSNR, SSIM, consistency, sharpness)",
        description="Crop each ground-truth image from the top-left to a multiple of the model's scale, "
        "make its low-resolution input as the paper did (antialiased bicubic, 8 bits), super-resolve it "
        "with SR3 and with bicubic upsampling, and compare both with the ground truth: PSNR, SSIM, "
        "consistency (MSE of the output downsampled vs the input) and sharpness ratio (high-frequency "
        "energy of the output / the ground truth's; bicubic lands below 1, added noise above 1).")
    ev.add_argument("inputs", nargs="+", help="ground-truth image files or folders (searched recursively)")
    ev.add_argument("--model", default=None,
                    help="sr3fast checkpoint or preset name (default: the built-in default model)")
    ev.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's recommended)")
    ev.add_argument("--sampler", default=None, help="sampler name (default: the model's recommended)")
    ev.add_argument("--start-gamma", type=float, default=None, metavar="G",
                    help="start from the input noised to level G (default: the model's recommended)")
    ev.add_argument("--back-projections", type=int, default=None, metavar="N",
                    help="back-projection steps after sampling (default: the model's recommended)")
    ev.add_argument("--seed", type=int, default=0, help="seed for every image (default 0)")
    ev.add_argument("--device", default="cpu", help="e.g. cuda, cpu (default cpu)")
    ev.add_argument("--json", metavar="F", help="write the results to this JSON file")
    ev.add_argument("--grid", metavar="G.png",
                    help="write a picture grid: one row per image, input | bicubic | SR3 | ground truth")
    ev.add_argument("-q", "--quiet", action="store_true", help="no per-image progress lines")
    ev.set_defaults(run=cmd_eval)

    tune = commands.add_parser(
        "tune-schedule", help="search the inference noise schedule on held-out images",
        description="The paper's inference-schedule search: for each step count, search the "
        "log-SNR schedule's end level and spacing (sr3fast.schedule_search) on crops of held-out "
        "ground-truth images, maximising PSNR while keeping the sharpness of the model's current "
        "settings (the guard), and write the best into the model's metadata; upscale then uses it "
        "by default.")
    tune.add_argument("--model", default="default",
                      help="sr3fast checkpoint, preset or 'default' (default: the built-in model)")
    tune.add_argument("--data", help="folder of held-out ground-truth images")
    tune.add_argument("--from-json", metavar="F",
                      help="instead of searching, read an earlier search's --json and choose again "
                           "(with this --guard and --slack) among the candidates it scored")
    tune.add_argument("--choose", type=int, metavar="N",
                      help="write the schedule found for N steps (one of those searched) instead of the "
                           "recommended step count")
    tune.add_argument("--steps", default="10,20,50", help="step counts to tune, e.g. 10,20,50")
    tune.add_argument("--sampler", default=None, help="sampler (default: the model's recommended)")
    tune.add_argument("-o", "--output", default=None, help="write the tuned model here (.safetensors)")
    tune.add_argument("--in-place", action="store_true", help="rewrite --model's checkpoint instead")
    tune.add_argument("--json", metavar="F", help="write every candidate's metrics to this JSON file")
    tune.add_argument("--crop", type=int, default=128, help="ground-truth crop size (default 128)")
    tune.add_argument("--crops-per-image", type=int, default=2, help="crops per image (default 2)")
    tune.add_argument("--grid", default="4x3", help="grid points of lambda_end x rho (default 4x3)")
    tune.add_argument("--rounds", type=int, default=1, help="refinement rounds (default 1)")
    tune.add_argument("--guard", type=float, default=None,
                      help="keep at least this fraction of the baseline's sharpness (default 0.9; with "
                           "--from-json, the earlier search's)")
    tune.add_argument("--baseline", choices=("recommended", "ancestral"), default="recommended",
                      help="whose sharpness the guard keeps: the model's recommended settings "
                           "(default), or the ancestral sampler over every training level from the "
                           "start (the quality reference; slower: hundreds of steps per crop)")
    tune.add_argument("--slack", type=float, default=0.1,
                      help="recommend the fewest steps within this many dB of the best (default 0.1)")
    tune.add_argument("--seed", type=int, default=0, help="seed for every candidate (default 0)")
    tune.add_argument("--device", default="cpu", help="e.g. cuda, cpu (default cpu)")
    tune.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tune.set_defaults(run=cmd_tune_schedule)

    from .study.cli import add_parser as add_study_parser
    add_study_parser(commands)

    convert = commands.add_parser("convert", help="public SR3 checkpoint + config -> sr3fast checkpoint")
    convert.add_argument("checkpoint", help="*_gen.pth of the public SR3 code")
    convert.add_argument("--config", required=True, help="its JSON config")
    convert.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    convert.set_defaults(run=cmd_convert)

    listing = commands.add_parser("presets", help="list the model presets")
    listing.set_defaults(run=cmd_presets)

    which = commands.add_parser("backends", help="which backend runs each op, and why")
    which.add_argument("--device", default="cpu")
    which.set_defaults(run=cmd_backends)

    from .train.cli import EPILOG, add_arguments, run as cmd_train
    training = commands.add_parser("train", help="train an SR3 model on a folder of images", epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(training).set_defaults(run=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (EXIT_STATUS_EPILOG). Errors a user can
    cause are printed as one line, never as a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ValueError, FileNotFoundError, IsADirectoryError) as err:
        print(f"sr3fast {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise
        print(f"sr3fast {args.command}: error: out of memory ({str(err).splitlines()[0]}); use smaller "
              "images or a smaller batch, or a device with more memory", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"sr3fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
