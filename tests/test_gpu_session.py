"""bench/gpu/run.sh, the one command a short GPU session runs: its budget, its stage timeouts,
and (in miniature, on this CPU) every stage end to end, so the script is known to work before a
GPU ever sees it. Also the switch that turns a missing backend into a failure."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpu import run as session
from bench.gpu import stages as plan

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu" / "run.sh"


def _script(*args: str, out: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    argv = ["bash", str(SCRIPT), *args, *(["--out", str(out)] if out else [])]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_every_stage_within_the_session_budget():
    done = _script("--dry-run")
    assert done.returncode == 0, done.stderr
    for stage in plan.STAGES:
        assert re.search(rf"^{re.escape(stage.name)}\s", done.stdout, re.M), stage.name
    total = int(re.search(r"^total budget: (\d+) s$", done.stdout, re.M).group(1))
    assert total == sum(stage.budget_s for stage in plan.STAGES)
    assert total <= 480


def test_a_hanging_stage_is_stopped_and_the_next_still_runs(tmp_path, monkeypatch):
    """A stage past its timeout is killed with its whole process group (the child that would
    outlive a plain kill included), and the stages after it run and are reported. Timings leave
    room for a loaded CI machine: the child has seconds to start before the stage is stopped."""
    started_marker, survived_marker = tmp_path / "child-started", tmp_path / "child-survived"
    child = (f"import time; open(r'{started_marker}', 'w').close(); time.sleep(8); "
             f"open(r'{survived_marker}', 'w').close()")
    hang = plan.Stage("hang", 14, "tests", "sleeps", gpu=(), tests=True, smoke=(
        "{python}", "-c", f"import subprocess, time; subprocess.Popen([{sys.executable!r}, '-c', {child!r}]); "
        "time.sleep(120)"))
    after = plan.Stage("after", 10, "bench", "runs", gpu=(), smoke=("{python}", "-c", "print('after ran')"))
    monkeypatch.setattr(session, "STAGES", (hang, after))
    monkeypatch.setattr(session, "check_budget", lambda: 60)
    began = time.monotonic()
    code = session.main(["--cpu-smoke", "--out", str(tmp_path), "--total", "60"])
    assert time.monotonic() - began < 60
    assert code == 1
    document = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert [(s["name"], s["status"]) for s in document["stages"]] == [("hang", "timeout"), ("after", "passed")]
    assert "after ran" in (tmp_path / "gpu-bench.log").read_text()
    assert started_marker.exists(), "the stage's child never started: the check below would prove nothing"
    time.sleep(10)
    assert not survived_marker.exists(), "a process of the timed-out stage outlived it"


def test_a_stage_with_no_time_left_is_reported_not_started(tmp_path, monkeypatch):
    """Under 55 s left, no stage starts (MIN_STAGE_S raised for the test, so a loaded machine's
    slow interpreter start cannot change the outcome): the first stage (60 s) runs and uses 6 s,
    the second is reported as not started."""
    quick = plan.Stage("quick", 60, "build", "", gpu=(), smoke=("{python}", "-c", "import time; time.sleep(6)"))
    late = plan.Stage("late", 0, "build", "", gpu=(), smoke=("{python}", "-c", "pass"))
    monkeypatch.setattr(session, "STAGES", (quick, late))
    monkeypatch.setattr(session, "check_budget", lambda: 60)
    monkeypatch.setattr(session, "MIN_STAGE_S", 55)
    assert session.main(["--cpu-smoke", "--out", str(tmp_path), "--total", "60"]) == 1
    document = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert [(s["name"], s["status"]) for s in document["stages"]] == [("quick", "passed"), ("late", "no time")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine's refusal")
def test_required_backends_turn_a_missing_backend_into_a_failure():
    """SR3FAST_REQUIRE_BACKENDS=cuda on a machine without CUDA: the run fails at once, naming the
    backend, instead of skipping every cuda test."""
    env = {**os.environ, "SR3FAST_REQUIRE_BACKENDS": "triton,cuda"}
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_io.py", "-q", "-p", "no:cacheprovider",
                           "-k", "atomic_path"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "cuda: " in done.stdout + done.stderr
    env["SR3FAST_REQUIRE_BACKENDS"] = "triton"
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_io.py", "-q", "-p", "no:cacheprovider",
                           "-k", "atomic_path"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU miniature; a GPU runs the real thing")
def test_cpu_smoke_runs_every_stage_and_writes_the_results(tmp_path):
    done = _script("--cpu-smoke", out=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    document = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert document["schema"] == 1 and document["mode"] == "cpu-smoke"
    assert [s["name"] for s in document["stages"]] == [s.name for s in plan.STAGES]
    assert all(s["status"] == "passed" for s in document["stages"]), document["stages"]
    for stage in document["stages"]:
        if stage["name"].startswith("test-"):
            assert stage["tests"]["passed"] >= 1 and not stage["tests"]["failed"], stage
    rows = document["rows"]
    assert {r["subject"] for r in rows if r["kind"] == "op"} == {"groupnorm_silu", "attention", "reverse_step"}
    assert {r["implementation"] for r in rows if r["subject"] == "attention"} >= {"sdpa:math", "bmm+softmax"}
    assert any(r["kind"] == "model" and r["status"] == "ok" for r in rows)
    assert all(r["status"] != "error" for r in rows)
    assert all(0 <= r["run"] < len(document["runs"]) for r in rows)
    assert {p.name for p in tmp_path.iterdir()} == {
        next(tmp_path.glob("gpu-*.json")).name, "gpu-summary.txt", "gpu-build.log", "gpu-tests.log",
        "gpu-bench.log"}
    assert "all stages passed" in (tmp_path / "gpu-summary.txt").read_text()
