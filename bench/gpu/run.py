"""Runs the stages of bench/gpu/stages.py under one time budget and writes what they found.

    bash bench/gpu/run.sh              # on the GPU machine: OUT=<folder> or --out <folder>
    bash bench/gpu/run.sh --dry-run    # the stages, their budgets and the total
    bash bench/gpu/run.sh --cpu-smoke  # every stage in miniature on a CPU (CI runs this)

Each stage runs as its own process group under a timeout (its budget plus what earlier stages
left unused, never past the session's total), so a hang costs one stage, not the session.
Written to the output folder (five files, all the device tool brings back):
  gpu-<date>.json     schema of bench/results/: every benchmark row, one run per bench stage,
                      plus "stages" (status, seconds, test counts and failures of each stage)
  gpu-summary.txt     the table printed at the end
  gpu-build.log, gpu-tests.log, gpu-bench.log   each stage's whole output, by group
Exit status: 0 when every stage passed, 1 otherwise (a skip for a missing backend is a failure).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gpu.stages import CPU_BACKENDS, STAGES, TOTAL_BUDGET_S, Stage, check_budget  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = 1                # bench/records.py's SCHEMA: the same document layout
MIN_STAGE_S = 3           # a stage with less time than this left is not started
KILL_GRACE_S = 5
INTERRUPT_GRACE_S = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the stages and budgets, run nothing")
    mode.add_argument("--cpu-smoke", action="store_true", help="every stage in miniature on the CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "gpu-out"),
                        help="folder for the results (default $OUT, else ./gpu-out)")
    parser.add_argument("--only", metavar="STAGE[,STAGE]", help="run only these stages (a rerun)")
    parser.add_argument("--total", type=int, default=TOTAL_BUDGET_S, metavar="S",
                        help=f"the session's time budget in seconds (default {TOTAL_BUDGET_S})")
    args = parser.parse_args(argv)
    names = {stage.name for stage in STAGES}
    args.only = [n for n in (args.only or "").split(",") if n]
    unknown = [n for n in args.only if n not in names]
    if unknown:
        parser.error(f"unknown stage {', '.join(unknown)}; stages: {', '.join(names)}")
    return args


def dry_run() -> int:
    total = check_budget()
    for stage in STAGES:
        budget = f"{stage.budget_s:4d} s" if stage.budget_s else "  left"
        print(f"{stage.name:28s} {budget}  {stage.what}")
    print(f"total budget: {total} s")
    return 0


def command(stage: Stage, smoke: bool, work: Path) -> list[str]:
    argv = [part.format(python=sys.executable, out=work, stage=stage.name)
            for part in (stage.smoke if smoke else stage.gpu)]
    if "-n" in argv and importlib.util.find_spec("xdist") is None:  # pytest-xdist absent: serial
        at = argv.index("-n")
        del argv[at:at + 2]
    return argv


def environment(stage: Stage, smoke: bool) -> dict:
    env = {**os.environ, **stage.env, "PYTHONUNBUFFERED": "1"}
    if smoke:
        env["SR3FAST_REQUIRE_BACKENDS"] = CPU_BACKENDS
        env["TRITON_INTERPRET"] = "1"
    else:
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
            env["CUDA_HOME"] = "/usr/local/cuda"
    return env


def run_stage(stage: Stage, argv: list[str], env: dict, timeout_s: float, log) -> tuple[str, int | None]:
    """(status, return code): passed, failed or timeout. The stage's output goes to `log`."""
    log.write(f"\n===== {stage.name}: {' '.join(argv)}\n")
    log.flush()
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=_default_interrupt)
    # pytest interrupted (SIGINT) still reports what ran and writes its junit XML: give it the
    # last seconds of the stage for that.
    grace = INTERRUPT_GRACE_S if stage.tests else 0
    try:
        code = process.wait(timeout=max(timeout_s - grace, 1))
    except subprocess.TimeoutExpired:
        _stop(process, interrupt_first=stage.tests)
        log.write(f"\n===== {stage.name}: stopped at its {timeout_s:.0f} s timeout\n")
        return "timeout", None
    return ("passed" if code == 0 else "failed"), code


def _default_interrupt() -> None:
    """In the stage's process, before exec: SIGINT back to its default action. A shell starts
    background commands with SIGINT ignored, which Python then keeps ignoring (no
    KeyboardInterrupt), so an interrupted pytest would neither stop nor write its report."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(process: subprocess.Popen, interrupt_first: bool) -> None:
    """The whole process group: pytest workers, compile workers, everything the stage started."""
    signals = [(signal.SIGINT, INTERRUPT_GRACE_S)] if interrupt_first else []
    for sig, grace in [*signals, (signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)]:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def test_results(path: Path) -> dict | None:
    """Counts and failed test ids from a junit XML, or None when pytest wrote none."""
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed = []
    for case in root.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()
            failed.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    return counts


def merge_bench(work: Path, stages: list[dict], mode: str) -> dict:
    """One document in bench/results/'s schema from every bench stage's JSON."""
    runs, rows = [], []
    for stage in stages:
        path = work / f"bench-{stage['name']}.json"
        if not path.exists():
            continue
        document = json.loads(path.read_text())
        offset = len(runs)
        for run in document["runs"]:
            run["settings"]["stage"] = stage["name"]
            runs.append(run)
        rows += [{**row, "run": row["run"] + offset} for row in document["rows"]]
        stage["rows"] = len(document["rows"])
        stage["row_errors"] = sum(row["status"] == "error" for row in document["rows"])
    return {"schema": SCHEMA, "mode": mode, "runs": runs, "rows": rows, "stages": stages}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summary(stages: list[dict], mode: str, elapsed: float, total: int) -> str:
    lines = [f"sr3fast GPU session ({mode}): {elapsed:.0f} s of {total} s budget",
             f"{'stage':28s} {'status':8s} {'s':>5s} {'of':>5s}  result"]
    for stage in stages:
        result = ""
        tests = stage.get("tests")
        if tests:
            result = (f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                      f"{tests['skipped']} skipped")
        elif "rows" in stage:
            result = f"{stage['rows']} rows, {stage['row_errors']} errors"
        lines.append(f"{stage['name']:28s} {stage['status']:8s} {stage['seconds']:5.0f} "
                     f"{stage['timeout_s']:5.0f}  {result}")
    for stage in stages:
        for failure in (stage.get("tests") or {}).get("failed", [])[:25]:
            lines.append(f"  FAILED {failure}")
    bad = [s["name"] for s in stages if s["status"] not in ("passed",)]
    lines.append("all stages passed" if not bad else f"NOT PASSED: {', '.join(bad)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run()
    check_budget()
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sr3fast-gpu-"))  # junit XML, bench JSON: not brought back
    logs = {group: open(args.out / f"gpu-{group}.log", "w") for group in ("build", "tests", "bench")}
    started = time.monotonic()
    deadline, slack, stages = started + args.total, 0.0, []
    for stage in STAGES:
        if args.only and stage.name not in args.only:
            continue
        left = deadline - time.monotonic()
        timeout_s = min(stage.budget_s + slack, left)
        record = {"name": stage.name, "what": stage.what, "budget_s": stage.budget_s,
                  "timeout_s": max(timeout_s, 0.0), "seconds": 0.0}
        if timeout_s < MIN_STAGE_S:
            record["status"] = "no time"
            print(f"[{time.monotonic() - started:4.0f}s] {stage.name}: not started, {timeout_s:.0f} s left",
                  flush=True)
            stages.append(record)
            continue
        argv = command(stage, args.cpu_smoke, work)
        print(f"[{time.monotonic() - started:4.0f}s] {stage.name} (timeout {timeout_s:.0f} s): {stage.what}",
              flush=True)
        began = time.monotonic()
        status, code = run_stage(stage, argv, environment(stage, args.cpu_smoke), timeout_s, logs[stage.group])
        record.update(status=status, returncode=code, seconds=time.monotonic() - began, argv=argv)
        if stage.tests:
            record["tests"] = test_results(work / f"junit-{stage.name}.xml")
        slack = max(0.0, timeout_s - record["seconds"]) if status == "passed" else max(
            0.0, stage.budget_s + slack - record["seconds"])
        print(f"[{time.monotonic() - started:4.0f}s] {stage.name}: {status} in {record['seconds']:.0f} s", flush=True)
        stages.append(record)
    for log in logs.values():
        log.close()
    document = merge_bench(work, stages, mode)
    document["settings"] = {"total_budget_s": args.total, "argv": sys.argv[1:]}
    date = datetime.date.today().isoformat()
    write_atomic(args.out / f"gpu-{date}.json", json.dumps(document, indent=1, default=str) + "\n")
    text = summary(stages, mode, time.monotonic() - started, args.total)
    write_atomic(args.out / "gpu-summary.txt", text + "\n")
    print("\n" + text)
    return 0 if all(stage["status"] == "passed" for stage in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
