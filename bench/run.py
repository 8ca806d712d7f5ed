"""sr3fast benchmarks: U-Net step time per configuration x batch x implementation, and the fused
ops at SR3's shapes, on the best available device.

    python bench/run.py                      # everything the device can run in reasonable time
    python bench/run.py --quick              # CI smoke test: a small subset, under two minutes on a CPU
    python bench/run.py --config paper-64-256 --batch 4 --impl reference-eager,fused-triton
    python bench/run.py --ops-only --json ops.json
    python bench/run.py --save               # bench/results/<device>-<date>.json

Exit status: 0 when every row ran or was skipped for a stated reason (an unavailable backend,
out of memory), 1 when any row failed, 2 on bad arguments. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import end_to_end, environment, hardware, loop_bench, model_bench, op_bench, op_cases, report  # noqa: E402
from bench.records import ERROR, Row, write_json  # noqa: E402
from bench.timing import Budget  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALL_KEYS = (*model_bench.KEYS, *loop_bench.KEYS)


def budgets(device: torch.device, quick: bool, repeats: int | None) -> tuple[Budget, Budget]:
    """(model budget, op budget). A CPU model step takes seconds, so few repeats there."""
    if quick:
        model, ops = Budget(1, 3, 10, 0.3), Budget(1, 3, 20, 0.2)
    elif device.type == "cuda":
        model, ops = Budget(5, 10, 100, 2.0), Budget(10, 25, 1000, 0.5)
    else:
        model, ops = Budget(1, 3, 20, 3.0), Budget(2, 5, 100, 0.5)
    if repeats:
        model = Budget(model.warmup, repeats, repeats, 0.0)
        ops = Budget(ops.warmup, repeats, repeats, 0.0)
    return model, ops


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when a GPU is visible, else cpu")
    parser.add_argument("--config", action="append", metavar="NAME",
                        help="model preset (repeat or comma-separate); default "
                             + ", ".join(model_bench.DEFAULT_CONFIGS))
    parser.add_argument("--batch", action="append", type=int, metavar="N",
                        help="batch size (repeatable); default 1, 4, 16 on GPU and 1 on CPU")
    parser.add_argument("--steps", type=int, default=100, metavar="N",
                        help="sampling steps for images/s (default 100, the paper's largest)")
    parser.add_argument("--impl", action="append", metavar="KEY",
                        help=f"model implementations and sampling loops (repeat or comma-separate): "
                             f"{', '.join(ALL_KEYS)}")
    parser.add_argument("--loop-steps", type=int, metavar="N",
                        help="sampling steps per timed call of the loop rows (default "
                             f"{loop_bench.GPU_STEPS} on GPU, {loop_bench.CPU_STEPS} on CPU)")
    parser.add_argument("--repeats", type=int, metavar="N", help="exactly N timed repeats per row")
    parser.add_argument("--compile-mode", metavar="MODE",
                        help="torch.compile mode of the compiled rows (default max-autotune on GPU, "
                             "default on CPU, where max-autotune takes too long)")
    parser.add_argument("--measure-sampling", action="store_true",
                        help="also time whole sampling runs (eager and compiled rows) instead of "
                             "only deriving images/s from the step time")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--ops-only", action="store_true", help="only the per-op microbenchmarks")
    selection.add_argument("--model-only", action="store_true", help="only the U-Net step benchmarks")
    selection.add_argument("--end-to-end-only", action="store_true",
                           help="only the end-to-end row (seconds per image, see --end-to-end)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: the tiny model at batch 1 without compiled model rows, the "
                             "smallest shape of each op, few repeats")
    parser.add_argument("--end-to-end", type=int, default=None, metavar="LOW",
                        help="side of the input of the end-to-end row, sr3fast's default against the "
                             f"public code's {end_to_end.PUBLIC_STEPS} ancestral steps (default 64 on "
                             "GPU, 32 on CPU, 16 with --quick; 0: leave the row out)")
    parser.add_argument("--public-steps", type=int, default=None, metavar="N",
                        help=f"steps of the end-to-end row's public default (default {end_to_end.PUBLIC_STEPS}, "
                             "its real count; 100 with --quick): fewer only for smoke runs")
    parser.add_argument("--op", action="append", metavar="NAME",
                        help="only these ops (repeat or comma-separate): "
                             + ", ".join(dict.fromkeys(c.op for c in op_cases.CASES)))
    parser.add_argument("--no-ceilings", action="store_true",
                        help="GPU: do not measure the copy bandwidth and bf16 GEMM rate first")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every row to PATH")
    parser.add_argument("--save", action="store_true",
                        help="add the rows to bench/results/<device-slug>-<YYYY-MM-DD>.json, replacing "
                             "earlier rows of the same cases")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, metavar="DIR",
                        help="where --save writes (default bench/results)")
    parser.add_argument("--list", action="store_true", help="list presets and implementations, then exit")
    args = parser.parse_args(argv)

    args.config = _split(args.config)
    args.op = _split(args.op)
    unknown_ops = sorted(set(args.op) - {c.op for c in op_cases.CASES})
    if unknown_ops:
        parser.error(f"unknown --op {', '.join(unknown_ops)}")
    args.impl = _split(args.impl) or list(ALL_KEYS)
    unknown = sorted(set(args.impl) - set(ALL_KEYS))
    if unknown:
        parser.error(f"unknown --impl {', '.join(unknown)}; choose from {', '.join(ALL_KEYS)}")
    if args.config:
        from sr3fast.model import presets
        names = presets()
        missing = [c for c in args.config if c not in names]
        if missing:
            parser.error(f"unknown --config {', '.join(missing)}; choose from {', '.join(names)}")
    for name in ("steps", "repeats", "loop_steps", "public_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch and min(args.batch) < 1:
        parser.error("--batch must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    return args


def _split(values: list[str] | None) -> list[str]:
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_ops(device: torch.device, quick: bool, budget: Budget, compile_mode: str,
            ceilings: dict | None = None, only: list[str] | None = None,
            on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    rows = []
    cases = op_cases.QUICK_CASES if quick else op_cases.CASES
    cases = [case for case in cases if not only or case.op in only]
    for op in dict.fromkeys(case.op for case in cases):
        op_cases_of = [case for case in cases if case.op == op]
        op_rows = op_bench.run_op(op_cases_of, device, budget, compile_mode, progress, ceilings, on_row)
        print(report.op_table(op, op_cases_of[0].unit, op_cases.NOTES.get(op), op_rows) + "\n", flush=True)
        rows += op_rows
    return rows


def run_models(args, device: torch.device, budget: Budget, compile_mode: str,
               on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    configs = args.config or list(model_bench.QUICK_CONFIGS if args.quick else model_bench.DEFAULT_CONFIGS)
    if args.batch:
        batches = args.batch
    else:
        batches = [1] if args.quick else list(model_bench.default_batches(device))
    settings = model_bench.ModelSettings(
        device, budget, compile_mode, args.steps, args.measure_sampling,
        skip_compiled="left out by --quick: compiling a U-Net takes minutes" if args.quick else None,
        cpu_defaults=device.type == "cpu" and not args.config)
    implementations = [impl for impl in model_bench.IMPLEMENTATIONS if impl.key in args.impl]
    loops = [impl for impl in loop_bench.LOOP_IMPLS if impl.key in args.impl]
    loop_steps = args.loop_steps or loop_bench.default_steps(device)
    rows = []
    if loops:
        stand_in = loop_bench.run_stand_in(loops, device, budget, loop_steps * 20, progress, on_row)
        print(report.loop_table(loop_bench.STAND_IN, stand_in) + "\n", flush=True)
        rows += stand_in
    for config in configs:
        description, config_rows = model_bench.run_config(config, batches, implementations, settings, progress,
                                                          on_row)
        print(report.model_table(config, description, config_rows) + "\n", flush=True)
        rows += config_rows
        if loops and not (len(config_rows) == 1 and config_rows[0].case == "*"):  # not a left-out config
            loop_rows = loop_bench.run_loops(config, batches, loops, device, budget, loop_steps, progress,
                                             on_row)
            print(report.loop_table(config, loop_rows) + "\n", flush=True)
            rows += loop_rows
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        from sr3fast.model import presets
        for name, config in presets().items():
            print(f"{name:16s} {config.description}")
        print("implementations: " + ", ".join(model_bench.KEYS))
        return 0
    started = time.perf_counter()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    compile_mode = args.compile_mode or ("max-autotune" if device.type == "cuda" else "default")
    op_compile_mode = model_bench.without_cuda_graphs(compile_mode)  # ops: device time, no graphs
    model_budget, op_budget = budgets(device, args.quick, args.repeats)

    info = environment.collect(device)
    if device.type == "cuda" and not (args.quick or args.no_ceilings):
        progress("measuring copy bandwidth and bf16 GEMM rate")
        info["ceilings"] = hardware.measure_ceilings(device)
    print("\n".join(environment.describe(info)) + "\n", flush=True)
    if device.type == "cpu" and not (args.config or args.quick or args.ops_only):
        print(f"CPU defaults: batch 1, configurations over {model_bench.CPU_DEFAULT_MAX_GFLOP} GFLOP per "
              "step left out (each says so), few repeats; pass --config/--batch to run more.\n")

    settings = {"argv": sys.argv[1:], "quick": args.quick, "steps": args.steps,
                "compile_mode": compile_mode, "op_compile_mode": op_compile_mode,
                "model_budget": asdict(model_budget), "op_budget": asdict(op_budget)}
    measured = []

    def checkpoint(row: Row) -> None:
        """--json holds every row measured so far: a run stopped at a time limit keeps them."""
        measured.append(row)
        if args.json:
            write_json(args.json, info, {**settings, "complete": False}, measured)

    rows = []
    if not (args.model_only or args.end_to_end_only):
        rows += run_ops(device, args.quick, op_budget, op_compile_mode, info.get("ceilings"), args.op,
                        checkpoint)
    if not (args.ops_only or args.end_to_end_only):
        rows += run_models(args, device, model_budget, compile_mode, checkpoint)
    low_side = args.end_to_end if args.end_to_end is not None else \
        (16 if args.quick else 64 if device.type == "cuda" else 32)
    if args.end_to_end_only and low_side <= 0:
        parser.error("--end-to-end-only needs an input side: --end-to-end LOW with LOW > 0")
    if not (args.ops_only or args.model_only) and low_side > 0:
        public_steps = args.public_steps or (100 if args.quick else end_to_end.PUBLIC_STEPS)
        e2e = end_to_end.run_end_to_end(device, low_side, progress, checkpoint, public_steps)
        print(end_to_end.table(e2e) + "\n", flush=True)
        rows += e2e

    memory_method = next((r.memory_method for r in rows if r.memory_method), "peak memory of the measured region")
    print(report.legend(args.steps, device.type, compile_mode, memory_method))
    elapsed = time.perf_counter() - started
    failures = [r for r in rows if r.status == ERROR]
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; {len(failures)} failed")

    settings.update(elapsed_s=elapsed, complete=True)
    if args.json:
        write_json(args.json, info, settings, rows)
        print(f"wrote {args.json}")
    if args.save:
        path = args.results_dir / f"{environment.slug(info)}-{datetime.date.today().isoformat()}.json"
        write_json(path, info, settings, rows, merge=True)
        print(f"saved {path} (rows of earlier runs today kept unless measured again)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
