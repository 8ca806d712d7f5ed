"""Prints what the session runs on: GPU, driver, clocks, and the versions of torch, triton, nvcc.

Never fails: a missing tool is reported as missing (on a CPU there is no nvidia-smi)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess


def _command(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return f"{argv[0]}: not found"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"{argv[0]}: no answer within 20 s"
    return (done.stdout + done.stderr).strip()


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = os.path.join(home, "bin", "nvcc")
    out = _command([nvcc if os.path.exists(nvcc) else "nvcc", "--version"])
    return out.splitlines()[-1] if out else "nvcc: no output"


def main() -> None:
    import torch
    print(f"python {platform.python_version()} at {os.path.realpath(os.sys.executable)}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cores {os.cpu_count()}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"nvcc: {_nvcc()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU {props.name}: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
              f"capability {props.major}.{props.minor}")
    print(_command(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                    "temperature.gpu,power.draw", "--format=csv"]))


if __name__ == "__main__":
    main()
