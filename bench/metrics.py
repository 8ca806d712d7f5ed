"""Quantities derived from a measured row: achieved rates, % of peak, roofline, speed-ups."""
from __future__ import annotations

import torch

from .hardware import Peak
from .records import OK, Row


def add_rates(row: Row, peak: Peak | None, dtype: torch.dtype, tf32: bool, primary: str) -> None:
    """Fill the achieved TFLOP/s and GB/s of `row` from its median time and work, and, where the
    device's peak is known, % of peak (of the `primary` quantity, "flops" or "bytes") and the
    roofline: the time the work would take at peak, the slower of arithmetic and memory."""
    if row.status != OK or not row.median_ms:
        return
    seconds = row.median_ms / 1e3
    if row.flops:
        row.tflops = row.flops / seconds / 1e12
    if row.bytes and primary == "bytes":  # a model row's floor bytes are no achieved bandwidth
        row.gbps = row.bytes / seconds / 1e9
    if peak is None:
        return
    peak_tflops, math_name = peak.tflops(dtype, tf32)
    if primary == "flops" and row.tflops is not None:
        row.percent_of_peak = 100 * row.tflops / peak_tflops
        row.peak_name = f"{peak.name} {math_name} {peak_tflops:g} TFLOP/s"
    elif primary == "bytes" and row.gbps is not None:
        row.percent_of_peak = 100 * row.gbps / (peak.memory_tbps * 1e3)
        row.peak_name = f"{peak.name} {peak.memory_tbps:g} TB/s"
    if row.flops and row.bytes:
        floor_s = max(row.flops / (peak_tflops * 1e12), row.bytes / (peak.memory_tbps * 1e12))
        row.roofline_ms = floor_s * 1e3
        row.percent_of_roofline = 100 * row.roofline_ms / row.median_ms


def add_measured_ceiling(row: Row, ceilings: dict | None, primary: str) -> None:
    """% of the ceiling measured on this device in the same run (`hardware.measure_ceilings`):
    copy bandwidth for bandwidth-bound rows, the bf16 GEMM rate for bf16 compute-bound rows."""
    if row.status != OK or not ceilings:
        return
    if primary == "bytes" and row.gbps is not None:
        row.extra["percent_of_measured"] = 100 * row.gbps / (ceilings["copy_tbps"] * 1e3)
        row.extra["measured_ceiling"] = f"copy {ceilings['copy_tbps']:.2f} TB/s"
    elif primary == "flops" and row.tflops is not None and row.dtype == "bfloat16":
        row.extra["percent_of_measured"] = 100 * row.tflops / ceilings["bf16_gemm_tflops"]
        row.extra["measured_ceiling"] = f"bf16 GEMM {ceilings['bf16_gemm_tflops']:.0f} TFLOP/s"


def add_speedups(rows: list[Row], baseline: str) -> None:
    """Speed-up of every measured row over the row named `baseline` of the same kind, subject
    and case (baseline median / row median); None where that row did not run."""
    medians = {}
    for r in rows:  # the first such row: rows of one label in several dtypes list fp32 first
        if r.implementation == baseline and r.status == OK:
            medians.setdefault((r.kind, r.subject, r.case), r.median_ms)
    for row in rows:
        if row.status != OK:
            continue
        reference = medians.get((row.kind, row.subject, row.case))
        row.baseline = baseline
        row.speedup = reference / row.median_ms if reference and row.median_ms else None


def add_derived_sampling(row: Row, steps: int) -> None:
    """Images per second of a `steps`-step sampling run, derived from one U-Net step's median:
    batch / (steps x step time). It leaves out the sampler's own work (one reverse_step per
    step, a few per cent), so a measured figure is slightly lower."""
    if row.status != OK or not row.median_ms or row.images_per_s_source == "measured":
        return
    row.sampling_steps = steps
    row.images_per_s = row.batch / (steps * row.median_ms / 1e3)
    row.images_per_s_source = "derived"
