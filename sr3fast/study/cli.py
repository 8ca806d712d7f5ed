"""`sr3fast study make | serve | report`: the command-line side of the study kit.

Parsing imports no torch (as the rest of the command line); errors a user can cause are raised
as UsageError / ValueError / FileNotFoundError, which `sr3fast.cli.main` prints as one line with
exit status 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import EXIT_OK, EXIT_STATUS_EPILOG, UsageError

DEFAULT_MIN_ATTENTION = 0.8
DEFAULT_RESAMPLES = 2000

DESCRIPTION = """\
The human evaluation of the SR3 paper (section 4.2.2): a two-alternative forced-choice study.
Participants see a model's output and the ground truth side by side (with or without the
low-resolution input between them) and pick the one they think a camera took; the fool rate
is how often they pick the model's. `make` builds the study folder, `serve` runs the page
that asks the questions, `report` computes the fool rates."""

REPORT_EPILOG = """\
intervals:
  Wilson  the Wilson score interval over trials: every answer taken as independent
  bootstrap  participants resampled with replacement (answers within one participant are
             correlated, so this one is the honest interval when people differ)

"""


def cmd_make(args) -> int:
    from ..cli import _device, _load_model
    from ..evaluation import find_images
    from .make import StudyModel, check_target, make_study

    names = args.model or ["default"]
    for name, value in (("--steps", args.steps), ("--n", args.n)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    check_target(args.out)                 # before loading anything: fail fast, write nothing
    find_images(args.data)
    device = _device(args.device)
    models = [StudyModel(name, _load_model(name, device=device, seed=args.seed)) for name in names]
    out = make_study(models, args.data, args.out, steps=args.steps, sampler=args.sampler, seed=args.seed,
                     n=args.n, crop=args.crop, scale=args.scale, attention_checks=args.attention_checks,
                     device=str(device), progress=not args.quiet)
    from .manifest import load_manifest
    manifest = load_manifest(out, verify=False)
    kinds = [trial["kind"] for trial in manifest["trials"]]
    print(f"wrote study {out}: {len(manifest['items'])} photos, {len(names)} model(s), "
          f"{kinds.count('model')} model trials and {kinds.count('attention')} attention checks per "
          f"participant; serve it with `sr3fast study serve {out}`")
    return EXIT_OK


def cmd_serve(args) -> int:
    from .server import serve

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, got {args.port}")
    try:
        serve(args.study, host=args.host, port=args.port, viewing_time=args.viewing_time)
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); choose "
                         "another --port, or stop what uses it") from None
    return EXIT_OK


def cmd_report(args) -> int:
    from ..evaluation import check_output_path
    from .manifest import ANSWERS, load_manifest
    from .report import build_report, write_outputs
    from .store import open_existing

    if args.json:
        check_output_path(args.json)
    if args.png:
        if Path(args.png).suffix.lower() != ".png":
            raise UsageError(f"--png {args.png!r} needs the .png suffix")
        check_output_path(args.png)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--png needs matplotlib: pip install matplotlib (or 'sr3fast[study]')") from None
    if args.bootstrap < 1:
        raise UsageError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    manifest = load_manifest(args.study)
    store = open_existing(Path(args.study) / ANSWERS, manifest["study_id"])
    answers = store.answers() if store is not None else []
    if not answers:
        raise UsageError(f"nobody has answered study {args.study!r} yet; run `sr3fast study serve "
                         f"{args.study}` and ask people to take part")
    report = build_report(manifest, answers, min_attention=args.min_attention, resamples=args.bootstrap,
                          seed=args.seed)
    print(report.table())
    try:
        written = write_outputs(report, json_path=args.json, png_path=args.png)
    except OSError as err:
        raise ValueError(f"cannot write the report ({err}); nothing was written") from None
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def add_parser(commands) -> argparse.ArgumentParser:
    """Add `study` and its sub-commands to the `sr3fast` sub-parsers `commands`."""
    formatter = argparse.RawDescriptionHelpFormatter
    study = commands.add_parser("study", help="the paper's human evaluation: a 2AFC study (make, serve, report)",
                                description=DESCRIPTION, epilog=EXIT_STATUS_EPILOG, formatter_class=formatter)
    steps = study.add_subparsers(dest="study_command", required=True, metavar="{make,serve,report}")

    make = steps.add_parser("make", help="build a study folder from ground-truth photos and models",
                            description="Make each photo's low-resolution input as `sr3fast eval` does "
                            "(antialiased bicubic downsampling, 8 bits), super-resolve it with every "
                            "--model, and write the study folder: the images (named by their SHA-256), "
                            "the trials of both task variants and the attention checks, and manifest.json "
                            "with every image's hash and the settings used. All or nothing: a failure leaves "
                            "no folder.", epilog=EXIT_STATUS_EPILOG, formatter_class=formatter)
    make.add_argument("--model", action="append", metavar="M",
                      help="sr3fast checkpoint, --out folder of `sr3fast train`, preset name or 'default' "
                           "(the built-in model, the default); repeat to compare several models (a public "
                           "*_gen.pth: `sr3fast convert` it first)")
    make.add_argument("--data", nargs="+", required=True, metavar="HR",
                      help="ground-truth photos: image files or folders (searched recursively)")
    make.add_argument("--out", required=True, metavar="STUDY", help="the study folder to create (must not exist)")
    make.add_argument("--steps", type=int, default=None, help="sampling steps (default: each model's recommended)")
    make.add_argument("--sampler", default=None, help="sampler (default: each model's recommended)")
    make.add_argument("--n", type=int, default=None, help="use N of the photos, drawn with --seed (default: all)")
    make.add_argument("--crop", type=int, default=None, metavar="PX",
                      help="one PX x PX crop from each photo's centre, a multiple of the scale (default: the "
                           "whole photo, cropped to a multiple of the scale)")
    make.add_argument("--scale", type=int, default=None,
                      help="overall factor, a power of each model's (default: the models' own)")
    make.add_argument("--seed", type=int, default=0,
                      help="sampling seed of every image, and the draw of --n photos and of the attention "
                           "checks; a preset's random weights too (default 0)")
    make.add_argument("--attention-checks", type=int, default=None, metavar="K",
                      help="attention trials per variant: the ground truth against a heavily blurred "
                           "picture, each on another photo (default 2, or 1 with one photo)")
    make.add_argument("--device", default="cpu", help="e.g. cuda, cpu (default cpu)")
    make.add_argument("-q", "--quiet", action="store_true", help="no per-photo progress lines")
    make.set_defaults(run=cmd_make)

    serve = steps.add_parser("serve", help="run the study's web page on this machine",
                             description="Serve the study's page: participants enter an id and answer one "
                             "trial at a time (keys F/left arrow and J/right arrow, or the mouse), in an order "
                             "balanced and reproducible per participant. Every answer is committed to "
                             "STUDY/answers.sqlite at once; a returning participant resumes. Ctrl-C stops.",
                             epilog=EXIT_STATUS_EPILOG, formatter_class=formatter)
    serve.add_argument("study", help="a folder made by `sr3fast study make`")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; another, e.g. "
                            "0.0.0.0, lets other machines take part, with a warning)")
    serve.add_argument("--viewing-time", type=float, default=None, metavar="SECONDS",
                       help="show each pair for this long, then hide it until the answer (default: no limit)")
    serve.set_defaults(run=cmd_serve)

    report = steps.add_parser("report", help="fool rates per model and variant, with 95%% intervals",
                              description="The fool rate (how often the model's image was picked over the "
                              "ground truth) per model and task variant, with two 95% intervals, and every "
                              "participant's attention checks.", epilog=REPORT_EPILOG + EXIT_STATUS_EPILOG,
                              formatter_class=formatter)
    report.add_argument("study", help="a folder made by `sr3fast study make`")
    report.add_argument("--json", metavar="F", help="write the report to this JSON file")
    report.add_argument("--png", metavar="F", help="write a bar chart to this PNG file (needs matplotlib)")
    report.add_argument("--min-attention", type=float, default=DEFAULT_MIN_ATTENTION, metavar="RATE",
                        help="leave out participants who passed fewer of their attention checks than this "
                             f"(default {DEFAULT_MIN_ATTENTION}; 0 keeps everyone)")
    report.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                        help=f"participant bootstrap resamples (default {DEFAULT_RESAMPLES})")
    report.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default 0)")
    report.set_defaults(run=cmd_report)
    return study
