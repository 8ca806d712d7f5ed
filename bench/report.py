"""Plain-text tables of the rows: one per configuration, one per op, and a legend."""
from __future__ import annotations

from .records import ERROR, OK, SKIPPED, Row

DASH = "–"


def model_table(config: str, description: str, rows: list[Row]) -> str:
    headers = ["batch", "implementation", "dtype", "ms/step", "[IQR]", "img/s", "peak mem",
               "TFLOP/s", "% peak", "% roofline", "speed-up", "compile s", "note"]
    if all(row.case == "*" for row in rows):  # the whole configuration was left out
        return "\n".join([f"{config}: {description}", *(f"  {_status(row)}" for row in rows)])
    shown, footnotes = _collapse_skips(rows)
    body = []
    for row in shown:
        lead = [str(row.batch if row.batch is not None else "*"), row.implementation, row.dtype]
        if row.status != OK:
            body.append(lead + [_status(row)])
            continue
        body.append(lead + [
            _ms(row.median_ms), _iqr(row), _images(row), _bytes(row.peak_memory_bytes),
            _sig(row.tflops), _pct(row.percent_of_peak), _pct(row.percent_of_roofline),
            _speedup(row.speedup), _num(row.compile_s, 1), row.note or ""])
    return "\n".join([f"{config}: {description}", _table(headers, body), *footnotes])


def loop_table(config: str, rows: list[Row]) -> str:
    """Sampling loops: ms/step of whole sampling calls, the U-Net alone, the loop's overhead."""
    headers = ["batch", "loop", "dtype", "ms/step", "[IQR]", "U-Net ms", "overhead/step", "img/s",
               "speed-up", "compile s", "note"]
    shown, footnotes = _collapse_skips(rows)
    body = []
    for row in shown:
        lead = [str(row.batch), row.implementation, row.dtype]
        if row.status != OK:
            body.append(lead + [_status(row)])
            continue
        overhead_us = row.extra["overhead_us_per_step"]
        body.append(lead + [
            _ms(row.median_ms), _iqr(row), _ms(row.extra["denoiser_ms"]), f"{overhead_us:.1f} µs",
            _images(row), _speedup(row.speedup), _num(row.compile_s, 1), row.note or ""])
    steps = next((row.sampling_steps for row in rows if row.sampling_steps), None)
    title = f"{config}: sampling loops ({steps}-step calls)" if steps else f"{config}: sampling loops"
    return "\n".join([title, _table(headers, body), *footnotes])


def op_table(op: str, unit: str, note: str | None, rows: list[Row]) -> str:
    headers = ["shape", "provider", "dtype", "µs", "[IQR]", unit, "% peak", "% measured", "speed-up",
               "compile s", "note"]
    shown, footnotes = _collapse_skips(rows)
    body = []
    for row in shown:
        lead = [row.case, row.implementation, row.dtype]
        if row.status != OK:
            body.append(lead + [_status(row)])
            continue
        rate = row.gbps if unit == "GB/s" else row.tflops
        body.append(lead + [
            _ms(row.median_ms * 1e3), _iqr(row, scale=1e3), _sig(rate),
            _pct(row.percent_of_peak), _pct(row.extra.get("percent_of_measured")), _speedup(row.speedup),
            _num(row.compile_s, 1), row.note or ""])
    title = f"{op} ({unit}{'; ' + note if note else ''})"
    return "\n".join([title, _table(headers, body), *footnotes])


def _collapse_skips(rows: list[Row]) -> tuple[list[Row], list[str]]:
    """An implementation skipped for the same reason in every case of the table becomes one
    line under it instead of a row per case; the JSON keeps every row."""
    cases = {row.case for row in rows}
    reasons: dict[tuple, set] = {}
    for row in rows:
        if row.status == SKIPPED:
            reasons.setdefault((row.implementation, row.dtype, row.reason), set()).add(row.case)
    collapsed = [key for key, seen in reasons.items() if seen == cases and len(cases) > 1]  # dicts keep order
    shown = [row for row in rows
             if row.status != SKIPPED or (row.implementation, row.dtype, row.reason) not in collapsed]
    footnotes = [f"  {impl} ({dtype}) skipped in every case: {reason}" for impl, dtype, reason in collapsed]
    return shown, footnotes


def _table(headers: list[str], body: list[list[str]]) -> str:
    """Columns padded to their widest cell; a row shorter than the header (a skipped row's
    reason) runs on past the remaining columns."""
    widths = [len(h) for h in headers]
    for cells in body:
        sized = cells if len(cells) == len(headers) else cells[:-1]
        widths = [max(w, len(c)) for w, c in zip(widths, sized)] + widths[len(sized):]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for cells in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def _status(row: Row) -> str:
    word = {SKIPPED: "skipped", ERROR: "ERROR"}[row.status]
    return f"{word}: {row.reason}"


def _ms(value: float | None) -> str:
    if value is None:
        return DASH
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if value >= limit:
            return f"{value:.{digits}f}"
    return f"{value:.3f}"


def _iqr(row: Row, scale: float = 1.0) -> str:
    if row.q1_ms is None:
        return DASH
    low, high = row.q1_ms * scale, row.q3_ms * scale
    return f"[{_ms(low)}–{_ms(high)}] n={row.repeats}"


def _images(row: Row) -> str:
    if row.images_per_s is None:
        return DASH
    tag = "m" if row.images_per_s_source == "measured" else "d"
    return f"{_sig(row.images_per_s)} {tag}"


def _bytes(value: int | None) -> str:
    if value is None:
        return DASH
    return f"{value / 2 ** 30:.2f} GiB" if value >= 2 ** 30 else f"{value / 2 ** 20:.0f} MiB"


def _num(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _sig(value: float | None) -> str:
    """Three significant figures, without an exponent down to 1e-4."""
    if value is None:
        return DASH
    if value >= 1000:
        return f"{value:.0f}"
    return f"{value:.3g}" if value >= 1e-4 or value == 0 else f"{value:.1e}"


def quantity(value: float) -> str:
    """A count for prose: '4.48', '92.4', '1,246'."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f}%"


def _speedup(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}x"


def legend(steps: int, device_type: str, compile_mode: str, memory_method: str) -> str:
    lines = [
        "How to read the tables",
        "  times      median of the repeats after warm-up ([IQR] = 25th-75th percentile, n repeats);"
        + (" CUDA events; ops: L2 flushed before each repeat, the op replayed from a CUDA graph "
           "(device time; the note gives the eager call's time, host dispatch included)"
           if device_type == "cuda"
           else " time.perf_counter on the CPU"),
        f"  img/s      images per second of a {steps}-step sampling run: 'd' derived from the step "
        "time (batch / (steps x ms/step), the sampler's own work left out), 'm' measured end to end",
        f"  peak mem   {memory_method}",
        "  TFLOP/s    FLOPs of convolutions and matrix products (torch.utils.flop_counter) / median time",
        "  % peak     of the datasheet peak for the row's dtype (bf16, or tf32 for fp32 when cuDNN "
        "allows it); ops: of peak memory bandwidth (GB/s rows) or matrix rate (TFLOP/s rows)",
        "  % roofline time at peak (the slower of FLOPs / peak rate and fused-floor bytes / peak "
        "bandwidth) over the median: 100% is the hardware's floor",
        "  bytes      fused floor: weights once per step, each conv/matmul operand read and result "
        "written once, attention scores on chip (bench/counting.py); ops: minimal reads + writes",
        "  speed-up   over 'reference eager' (models) or 'torch' (ops) of the same case in this run",
        f"  compile s  first call of a compiled row (mode {compile_mode}), kept out of the times; "
        "loop rows: the package's export",
        "  loops      ms/step = a whole sampling call / its steps; U-Net ms = one denoiser call alone"
        + (" (its CUDA graph replayed: kernel time, no launch gaps)" if device_type == "cuda" else "")
        + "; overhead/step = the difference, the loop's own cost"
        + ("" if device_type == "cuda" else " (two separate measurements: below their noise it can "
           "come out negative)") + "; speed-up over the Python loop",
    ]
    return "\n".join(lines)
