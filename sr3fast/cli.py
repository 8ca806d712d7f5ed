"""The `sr3fast` command line (also `python -m sr3fast`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .images import IMAGE_SUFFIXES


def _collect_inputs(paths: list[str]) -> list[Path]:
    """Image files named directly, plus the images directly inside named folders (sorted)."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SystemExit(f"sr3fast: folder {name!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"sr3fast: input {name!r} does not exist")
    return files


def _output_paths(inputs: list[Path], output: str) -> list[Path]:
    """One output path per input. OUT is a file when one input is given and OUT has an image
    suffix; otherwise a folder (created if its parent exists) receiving <stem>.png per input."""
    out = Path(output)
    if len(inputs) == 1 and out.suffix.lower() in IMAGE_SUFFIXES:
        if not out.parent.is_dir():
            raise SystemExit(f"sr3fast: output folder {str(out.parent)!r} does not exist")
        return [out]
    if out.suffix.lower() in IMAGE_SUFFIXES:
        raise SystemExit(f"sr3fast: {len(inputs)} inputs need an output folder, not the file {output!r}")
    if not out.is_dir():
        if not out.parent.is_dir():
            raise SystemExit(f"sr3fast: cannot create output folder {output!r}: "
                             f"{str(out.parent)!r} does not exist")
        out.mkdir()
    targets = [out / f"{path.stem}.png" for path in inputs]
    if len(set(targets)) != len(targets):
        raise SystemExit("sr3fast: two inputs share a file name stem; upscale them into separate folders")
    return targets


def cmd_upscale(args) -> int:
    import sr3fast
    from .images import save_image_atomic

    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"sr3fast: --steps must be at least 1, got {args.steps}")
    inputs = _collect_inputs(args.inputs)
    outputs = _output_paths(inputs, args.output)
    model = sr3fast.load(args.model, config=args.config, device=args.device)
    for index, (source, target) in enumerate(zip(inputs, outputs)):
        image = sr3fast.upscale(source, model=model, steps=args.steps, sampler=args.sampler,
                                seed=None if args.seed is None else args.seed + index,
                                progress=not args.quiet, loop=args.loop, package=args.package)
        save_image_atomic(image, target)
        print(f"{source} -> {target} ({image.width}x{image.height})")
    return 0


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
    try:
        model = api.load(name, device=args.device)
    except Exception as err:
        what = "the default model (no --model given)" if args.model is None else f"model {name!r}"
        reason = str(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {err}"
        raise ValueError(f"cannot load {what}: {reason}. Pass --model with an sr3fast checkpoint or a "
                         "preset name (`sr3fast presets` lists them)") from None
    report = evaluate_images(model, paths, steps=args.steps, sampler=args.sampler, seed=args.seed,
                             progress=not args.quiet, keep_images=bool(args.grid), model_name=name)
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


DTYPES = ("float32", "bfloat16", "float16")


def cmd_export(args) -> int:
    import time

    import torch

    import sr3fast
    from .export import export

    model = sr3fast.load(args.model, config=args.config)
    started = time.perf_counter()
    with sr3fast.backend(args.backend):
        path = export(model, args.output, batch=args.batch, size=args.size, device=args.device,
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
    parser = argparse.ArgumentParser(prog="sr3fast", description="Fast SR3 diffusion super-resolution")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("upscale", help="super-resolve images")
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
    up.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    up.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where the model loads)")
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
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, IsADirectoryError) as err:
        print(f"sr3fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
