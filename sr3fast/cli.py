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


class UsageError(Exception):
    """Something the user asked for cannot be done as given; the message says what to change.
    Raised before anything is written; the command exits with EXIT_USAGE."""


def _collect_inputs(paths: list[str]) -> list[Path]:
    """Image files named directly, plus the images directly inside named folders (sorted)."""
    from .images import IMAGE_SUFFIXES

    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"folder {name!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"input {name!r} does not exist")
    return files


def _output_paths(inputs: list[Path], output: str) -> tuple[list[Path], Path | None]:
    """One output path per input, and the folder to create before writing them (None if there
    is none to create). OUT is a file when one input is given and OUT has an image suffix;
    otherwise a folder (created if its parent exists) receiving <stem>.png per input.
    Creates nothing: the folder is made only when the first image is ready to be written."""
    from .images import IMAGE_SUFFIXES

    out = Path(output)
    if len(inputs) == 1 and out.suffix.lower() in IMAGE_SUFFIXES:
        if not out.parent.is_dir():
            raise UsageError(f"output folder {str(out.parent)!r} does not exist")
        return [out], None
    if out.suffix.lower() in IMAGE_SUFFIXES:
        raise UsageError(f"{len(inputs)} inputs need an output folder, not the file {output!r}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {output!r} is a file; name a folder for {len(inputs)} images")
    if not out.is_dir() and not out.parent.is_dir():
        raise UsageError(f"cannot create output folder {output!r}: {str(out.parent)!r} does not exist")
    targets = [out / f"{path.stem}.png" for path in inputs]
    if len(set(targets)) != len(targets):
        raise UsageError("two inputs share a file name stem; upscale them into separate folders")
    return targets, None if out.is_dir() else out


def _device(name: str | None):
    """The torch.device --device names, checked to exist on this machine (None stays None)."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N "
                         "(N: the GPU's index)") from None
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)          # torch.cuda, torch.mps, torch.xpu, ...
    if module is None or not hasattr(module, "is_available") or not module.is_available():
        no_cuda = device.type == "cuda" and not torch.version.cuda
        raise UsageError(f"--device {name}: no {device.type} device is available on this machine"
                         f"{' (this torch was built without CUDA)' if no_cuda else ''}; use --device cpu")
    count = module.device_count() if hasattr(module, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {name}: this machine has {count} {device.type} device(s), "
                         f"{device.type}:0 to {device.type}:{count - 1}")
    return device


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
    if isinstance(err, (ValueError, FloatingPointError, OSError)):
        return f"cannot upscale {str(source)!r}: {err}"
    return None


def cmd_upscale(args) -> int:
    from . import api
    from .images import save_image_atomic

    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    inputs = _collect_inputs(args.inputs)
    outputs, folder = _output_paths(inputs, args.output)
    device = _device(args.device)
    model = _load_model(args.model, config=args.config, device=device, dtype=_dtype(args.dtype, device),
                        seed=args.seed)
    try:       # the checks upscale makes, before anything is written
        api._settings(model, args.sampler, args.steps, None, args.eta, args.start_gamma)
        api._back_projections(model, args.back_projections)
    except ValueError as err:
        raise UsageError(str(err)) from None
    failed = 0
    for index, (source, target) in enumerate(zip(inputs, outputs)):
        try:
            image = api.upscale(source, model=model, steps=args.steps, sampler=args.sampler, eta=args.eta,
                                start_gamma=args.start_gamma, back_projections=args.back_projections,
                                seed=None if args.seed is None else args.seed + index,
                                progress=not args.quiet, loop=args.loop, package=args.package)
            if folder is not None:
                folder.mkdir(exist_ok=True)
            save_image_atomic(image, target)
        except Exception as err:
            message = _upscale_failure(err, source, device)
            if message is None:
                raise
            print(f"sr3fast upscale: error: {message}", file=sys.stderr)
            failed += 1
            continue
        print(f"{source} -> {target} ({image.width}x{image.height})")
    if failed:
        print(f"sr3fast upscale: {failed} of {len(inputs)} inputs failed", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


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


def cmd_convert(args) -> int:
    import sr3fast

    model = sr3fast.load(args.checkpoint, config=args.config)
    path = sr3fast.save(model, args.output)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({params:,} parameters, {model.config.low_res}->{model.config.high_res})")
    return 0


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

    up = commands.add_parser("upscale", help="super-resolve images", epilog=EXIT_STATUS_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("inputs", nargs="+", help="image files or folders of images")
    up.add_argument("-o", "--output", required=True,
                    help="output image (one input) or folder (written as <name>.png)")
    up.add_argument("--model", default="default",
                    help="sr3fast checkpoint, public *_gen.pth (with --config) or preset name "
                         "(default: the built-in 4x model, docs/model-card.md)")
    up.add_argument("--config", help="JSON config of a public SR3 checkpoint")
    up.add_argument("--steps", type=int, default=None,
                    help="sampling steps (default: the model's recommended, else 100)")
    up.add_argument("--sampler", choices=("posterior", "sr3", "ddim"), default=None,
                    help="default: the model's recommended, else posterior for public checkpoints, "
                         "sr3 for paper models")
    up.add_argument("--eta", type=float, default=None,
                    help="DDIM's noise scale, with --sampler ddim only: 0 deterministic (default), "
                         "1 the posterior variance")
    up.add_argument("--start-gamma", type=float, default=None, metavar="G",
                    help="start from the input noised to level G in [0, 1) instead of pure noise "
                         "(default: the model's recommended; 0: pure noise)")
    up.add_argument("--back-projections", type=int, default=None, metavar="N",
                    help="back-projection steps toward the input after sampling (default: the model's "
                         "recommended; 0: off)")
    up.add_argument("--seed", type=int, default=None,
                    help="seed for reproducible samples (image i gets seed + i); with a preset name as "
                         "--model, also the seed of its random weights")
    up.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default cpu)")
    up.add_argument("--dtype", choices=DTYPES, default=None,
                    help="precision of the weights and sampling (default: float32 on cpu, the "
                         "checkpoint's elsewhere); a --package needs the dtype it was exported with")
    up.add_argument("--loop", choices=("python", "cpp", "graph"), default="python",
                    help="where the sampling steps run: python, cpp (C++), graph (CUDA graph)")
    up.add_argument("--package", help="the U-Net compiled by `sr3fast export` for these images' size")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
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
