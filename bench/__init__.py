"""sr3fast's benchmark harness: `python bench/run.py` (see bench/README.md).

Modules, one job each: timing (how a callable is timed), memory (peak memory of a region),
environment (what it ran on), hardware (datasheet peaks, measured ceilings), counting (FLOPs
and bytes of a U-Net step), op_cases / op_bench (per-op microbenchmarks), model_bench (U-Net
step rows), metrics (rates, % of peak, roofline, speed-ups), records (rows, JSON), report
(tables), run (command line). test_bench_ops.py is the pytest-benchmark view of the op cases.
"""
