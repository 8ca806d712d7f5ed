"""One result row, shared by the model and op benchmarks, and the JSON file that holds a run."""
from __future__ import annotations

import json
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sr3fast.atomic import atomic_path

SCHEMA = 1
OK, SKIPPED, ERROR = "ok", "skipped", "error"


@dataclass
class Row:
    """A measured (or skipped, or failed) implementation of one case.

    kind "model": subject is a configuration, case its batch; work is one U-Net step.
    kind "op": subject is an op, case its shape; work is one call.
    Times are milliseconds; speedup is against the row named in `baseline`, same run and case.
    """
    kind: str
    subject: str
    case: str
    implementation: str
    dtype: str
    status: str = OK
    reason: str | None = None            # why skipped or failed
    note: str | None = None              # what else the reader must know (fallbacks, modes)
    backends: dict | None = None         # op -> backend that ran it
    batch: int | None = None
    median_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    repeats: int | None = None
    warmup: int | None = None
    compile_s: float | None = None       # first call, compile included; not in the times
    peak_memory_bytes: int | None = None
    memory_method: str | None = None
    flops: int | None = None             # per call / per U-Net step
    bytes: int | None = None             # minimal traffic per call / fused-floor per step
    tflops: float | None = None
    gbps: float | None = None
    peak_name: str | None = None         # which datasheet peak the percentages divide by
    percent_of_peak: float | None = None
    roofline_ms: float | None = None     # max(flops / peak rate, bytes / peak bandwidth)
    percent_of_roofline: float | None = None
    baseline: str | None = None
    speedup: float | None = None
    sampling_steps: int | None = None
    images_per_s: float | None = None
    images_per_s_source: str | None = None   # "derived" from the step time, or "measured"
    extra: dict = field(default_factory=dict)

    def set_timing(self, summary: dict) -> None:
        for key, value in summary.items():
            setattr(self, key, value)

    def skip(self, reason: str) -> "Row":
        self.status, self.reason = SKIPPED, reason
        return self

    def fail(self, reason: str) -> "Row":
        self.status, self.reason = ERROR, reason
        return self


@contextmanager
def measuring(row: Row, context: str = "", cleanup: Callable[[], None] | None = None):
    """Run one row's measurement: out of memory skips the row; any other exception is a real
    failure, printed and recorded in the row (and so in the run's exit status). Dynamo's caches
    are reset afterwards so no row reuses another's compilation."""
    try:
        yield row
    except torch.cuda.OutOfMemoryError as err:
        row.skip(f"out of memory{context}: {str(err).splitlines()[0]}")
    except Exception as err:
        traceback.print_exc()
        row.fail(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    finally:
        torch._dynamo.reset()
        if cleanup is not None:
            cleanup()


def write_json(path: Path, environment: dict, settings: dict, rows: list[Row], merge: bool = False) -> None:
    """Write the run to `path` atomically: {"schema", "runs": [{environment, settings}], "rows"},
    each row naming its run by index.

    merge=True keeps the rows of earlier runs already in `path` except those this run measured
    again (same kind, subject, case, implementation, dtype), so a run split into several
    commands (one configuration each, say) ends in one file."""
    runs, kept = [], []
    if merge and path.exists():
        earlier = json.loads(path.read_text())
        if earlier.get("schema") != SCHEMA:
            raise ValueError(f"{path} holds results of schema {earlier.get('schema')!r}, not {SCHEMA}; "
                             "move it away or save elsewhere")
        runs = earlier["runs"]
        measured = {_key(row) for row in map(asdict, rows)}
        kept = [row for row in earlier["rows"] if _key(row) not in measured]
    runs.append({"environment": environment, "settings": settings})
    document = {"schema": SCHEMA, "runs": runs,
                "rows": kept + [{**asdict(row), "run": len(runs) - 1} for row in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=1, default=str) + "\n")


def _key(row: dict) -> tuple:
    return row["kind"], row["subject"], row["case"], row["implementation"], row["dtype"]
