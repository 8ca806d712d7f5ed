"""Command line of training: `sr3fast train ...`, `python -m sr3fast.train ...`, and under
`torchrun --nproc_per_node=N -m sr3fast.train ...` for several GPUs (or CPU processes).

Kept light: argparse only; torch and the trainer load when a run starts.
"""
from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  sr3fast train --data photos/ --preset small --out runs/small --steps 20000 --batch 16 --warmup 1000
  sr3fast train --data photos/ --preset small --out runs/small --steps 40000 --resume
  torchrun --nproc_per_node=8 -m sr3fast.train --data photos/ --preset paper-64-256 \\
      --out runs/p256 --steps 1000000 --batch 256 --bf16 --compile

OUT receives metrics.jsonl (step, loss, lr, images_per_s per logged step), validation.jsonl,
samples/step_N.png (input | bicubic | sample | target), checkpoints/step_N/ (model.safetensors:
EMA weights, what sr3fast.load and `sr3fast upscale --model` use; online.safetensors; trainer.pt)
and, at the end, model.safetensors (the final EMA weights).
"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training options (the fields of sr3fast.train.TrainConfig)."""
    run = parser.add_argument_group("run")
    run.add_argument("--data", required=True,
                     help="folder of high-resolution images (any size; subfolders too), or the public "
                          "SR3 code's prepared folder (hr_R/, lr_r/, sr_r_R/)")
    run.add_argument("--out", required=True, help="output folder (logs, samples, checkpoints)")
    run.add_argument("--preset", required=True, help="model architecture (list: sr3fast presets)")
    run.add_argument("--steps", type=int, default=100_000, help="optimizer steps in all (default 100000)")
    run.add_argument("--batch", type=int, default=16,
                     help="global batch: images per step over all processes (default 16)")
    run.add_argument("--accum", type=int, default=1,
                     help="split each process's share of the batch into this many micro-batches")
    run.add_argument("--seed", type=int, default=0, help="seed of weights, data order, noise (default 0)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest complete checkpoint in OUT (from step 0 if none)")
    run.add_argument("--device", default=None, help="default: cuda (this process's GPU) if available, else cpu")
    run.add_argument("--workers", type=int, default=2, help="data loading processes (default 2)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    opt = parser.add_argument_group("optimisation (the paper: Adam, 1e-4, 10k warm-up steps)")
    opt.add_argument("--mode", choices=("diffusion", "regression"), default="diffusion",
                     help="SR3 (Algorithm 1), or the paper's regression baseline (y0 from x, MSE)")
    opt.add_argument("--loss", choices=("l1", "l2"), default="l1",
                     help="norm of the noise-prediction error (default l1; regression always uses MSE)")
    opt.add_argument("--lr", type=float, default=None, help="default 1e-4 (regression: 1e-5)")
    opt.add_argument("--warmup", type=int, default=10_000, help="linear LR warm-up steps (default 10000)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0: off (default 1)")
    opt.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (default 0.9999)")
    opt.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    opt.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and optimizer stay fp32)")
    opt.add_argument("--compile", action="store_true", help="torch.compile the U-Net")

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    aug.add_argument("--blur", type=float, default=0.0, metavar="P",
                     help="blur the low-resolution input with probability P (the paper's augmentation)")
    aug.add_argument("--blur-sigma", type=float, nargs=2, default=(0.4, 0.6), metavar=("LOW", "HIGH"),
                     help="range of the blur's sigma (default 0.4 0.6)")

    val = parser.add_argument_group("validation, logging, checkpoints")
    val.add_argument("--val", default=None,
                     help="folder of validation images (default: hold out some of --data)")
    val.add_argument("--holdout", type=int, default=None,
                     help="images of --data held out when --val is not given (default: 10%%, 1 to --val-images)")
    val.add_argument("--val-images", type=int, default=4, help="images per validation (default 4)")
    val.add_argument("--val-steps", type=int, default=50, help="sampling steps of validation (default 50)")
    val.add_argument("--val-every", type=int, default=1000, help="steps between validations; 0: never")
    val.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
    val.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    val.add_argument("--log-every", type=int, default=10, help="steps between log lines (default 10)")
    return parser


def config_from_args(args: argparse.Namespace):
    from .config import TrainConfig

    return TrainConfig(
        data=args.data, out=args.out, preset=args.preset, steps=args.steps, batch=args.batch,
        accum=args.accum, lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, loss=args.loss, mode=args.mode, seed=args.seed, bf16=args.bf16,
        compile=args.compile, flip=args.flip, blur=args.blur, blur_sigma=tuple(args.blur_sigma),
        dropout=args.dropout, val=args.val, holdout=args.holdout, val_images=args.val_images,
        val_steps=args.val_steps, val_every=args.val_every, save_every=args.save_every,
        keep=args.keep, log_every=args.log_every, workers=args.workers, device=args.device,
        resume=args.resume, progress=not args.quiet)


def run(args: argparse.Namespace) -> int:
    from .trainer import train

    try:
        train(config_from_args(args))
    except FloatingPointError as err:  # a diverged loss: say what to do, no traceback
        raise SystemExit(f"sr3fast train: error: {err}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sr3fast.train", epilog=EPILOG,
                                     description="Train an SR3 super-resolution model",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"sr3fast train: error: {err}", file=sys.stderr)
        return 2
