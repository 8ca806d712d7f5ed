#!/usr/bin/env bash
# Creates .venv with torch and sr3fast (editable, with test extras) and builds the C++/CUDA
# extension. Needs only Python 3.10+ and pip. Re-running it is safe and quick.
#   PYTHON=python3.11        interpreter to create the venv with
#   TORCH_SPEC="torch==2.14.1"   which torch to install
#   SR3FAST_BUILD_CUDA=1 / 0 compile the extension's CUDA kernels even without a visible GPU (CI
#                            does, so that a .cu error fails it) / never. Unset: compile them only
#                            where a GPU is visible (`nvidia-smi -L`, or torch sees one). They take
#                            most of the build and cannot run on a machine without a GPU.
#   SR3FAST_SKIP_EXT=1       build no extension at all (pure Python + Triton)
#   SR3FAST_SKIP_CUDA=1      build the extension's CPU half only (as SR3FAST_BUILD_CUDA=0)
#   SR3FAST_REQUIRE_EXT=1    fail when the extension does not build (see setup.py)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

flag() {  # flag NAME: whether the variable is set to a true value, as setup.py reads it
  case "$(printf '%s' "${!1:-0}" | tr '[:upper:]' '[:lower:]')" in 1|true|yes|on) return 0 ;; *) return 1 ;; esac
}

# The toolkit root, not the folder of whatever `nvcc` is first on PATH (it may be a wrapper).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC" numpy setuptools wheel ninja

gpu_visible() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    return 0
  fi
  .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

# Which halves of the extension to compile. setup.py compiles the CUDA half wherever it finds a
# toolkit unless SR3FAST_SKIP_CUDA=1: set that here when the CUDA half is not wanted.
cuda_reason=""
if flag SR3FAST_SKIP_EXT; then
  cuda_reason="no extension (SR3FAST_SKIP_EXT=1)"
elif flag SR3FAST_BUILD_CUDA; then
  if flag SR3FAST_SKIP_CUDA; then
    echo "setup.sh: SR3FAST_BUILD_CUDA=1 and SR3FAST_SKIP_CUDA=1 contradict each other; unset one" >&2
    exit 2
  fi
  # Asked for: fail here rather than quietly build the CPU half only.
  if ! { [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ] || [ -x "${CUDA_PATH:-/nonexistent}/bin/nvcc" ] \
         || [ -x /usr/local/cuda/bin/nvcc ] || [ -x /opt/cuda/bin/nvcc ]; }; then
    echo "setup.sh: SR3FAST_BUILD_CUDA=1 but no CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc)" >&2
    exit 2
  fi
  if ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
    echo "setup.sh: SR3FAST_BUILD_CUDA=1 but $TORCH_SPEC in .venv is a CPU-only build of torch" >&2
    exit 2
  fi
  cuda_reason="CUDA kernels compiled (SR3FAST_BUILD_CUDA=$SR3FAST_BUILD_CUDA)"
elif flag SR3FAST_SKIP_CUDA; then
  cuda_reason="CUDA kernels skipped (SR3FAST_SKIP_CUDA=1)"
elif [ -n "${SR3FAST_BUILD_CUDA:-}" ]; then
  export SR3FAST_SKIP_CUDA=1
  cuda_reason="CUDA kernels skipped (SR3FAST_BUILD_CUDA=$SR3FAST_BUILD_CUDA)"
elif gpu_visible; then
  cuda_reason="CUDA kernels compiled where a CUDA toolkit is found (a GPU is visible)"
else
  export SR3FAST_SKIP_CUDA=1
  cuda_reason="CUDA kernels skipped: no GPU visible (SR3FAST_BUILD_CUDA=1 compiles them anyway)"
fi
echo "setup.sh: extension: $cuda_reason"

# --no-build-isolation: build the extension against the torch just installed.
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python -m pip install --quiet --no-build-isolation -e ".[test]"
.venv/bin/python - <<'PY'
import torch, sr3fast
print(f"sr3fast {sr3fast.__version__} with torch {torch.__version__}")
print(sr3fast.explain_backend("cpu"))
PY
