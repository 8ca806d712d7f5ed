#!/usr/bin/env bash
# One prepared GPU session (bench/gpu/run.py): install, tests, benchmarks, each stage with its
# own timeout, all within 480 s. Run from anywhere; results go to $OUT or --out.
#   bash bench/gpu/run.sh [--dry-run | --cpu-smoke] [--out DIR] [--only STAGE,...]
# PYTHON picks the interpreter (default: python3, the one holding torch on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" -m bench.gpu.run "$@"
