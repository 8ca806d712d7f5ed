#!/usr/bin/env bash
# Creates .venv with torch and sr3fast (editable, with test extras) and builds the C++/CUDA
# extension. Needs only Python 3.10+ and pip. Re-running it is safe and quick.
#   PYTHON=python3.11        interpreter to create the venv with
#   TORCH_SPEC="torch==2.14.1"   which torch to install
#   SR3FAST_SKIP_EXT=1 / SR3FAST_SKIP_CUDA=1 / SR3FAST_REQUIRE_EXT=1   see setup.py
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

# The toolkit root, not the folder of whatever `nvcc` is first on PATH (it may be a wrapper).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC" numpy setuptools wheel ninja
# --no-build-isolation: build the extension against the torch just installed.
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python -m pip install --quiet --no-build-isolation -e ".[test]"
.venv/bin/python - <<'PY'
import torch, sr3fast
print(f"sr3fast {sr3fast.__version__} with torch {torch.__version__}")
print(sr3fast.explain_backend("cpu"))
PY
