"""Runs groups of pytest node ids, one process each, and prints the native backtrace of a crash.

    python -m bench.gpu.backtrace TEST_ID[,TEST_ID...] [TEST_ID[,TEST_ID...] ...]

The ids of a group run in one process (in collection order), so a crash that needs an earlier
test's leftovers reproduces.
A segfault inside an extension shows only its Python frames through faulthandler. The GPU
machine has no gdb, but cuda-gdb debugs host code too: each test runs under
`cuda-gdb -batch -ex run -ex bt` when cuda-gdb is on the PATH (else plainly, faulthandler on).
Exits non-zero when any test failed or crashed; a test id that matches nothing is an error.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys


def command(test_ids: list[str]) -> list[str]:
    pytest = [sys.executable, "-X", "faulthandler", "-m", "pytest", *test_ids, "-q", "-p", "no:cacheprovider",
              "-p", "no:xdist"]
    debugger = shutil.which("cuda-gdb")
    if debugger is None:
        return pytest
    return [debugger, "-q", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
            "--args", *pytest]


def main(groups: list[str]) -> int:
    failed = 0
    for group in groups:
        argv = command(group.split(","))
        print(f"===== {group}: {' '.join(argv[:3])} ...", flush=True)
        done = subprocess.run(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # Under the debugger the exit status is the debugger's; pytest's own summary line says more.
        failed += done.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
