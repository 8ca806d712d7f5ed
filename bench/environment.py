"""What the numbers were measured on: device, driver, library versions, CPU, threads, commit."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

import sr3fast

from . import hardware

_REPO = Path(__file__).resolve().parents[1]


def collect(device: torch.device) -> dict:
    """Everything a reader needs to reproduce or compare a run, as plain JSON-able values."""
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device_type": device.type,
        "device": _cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "sr3fast": sr3fast.__version__,
        "sr3fast_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "triton_autotune": os.environ.get("SR3FAST_TRITON_AUTOTUNE") or "autotuned",
        "sr3fast_backend_env": os.environ.get("SR3FAST_BACKEND"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak = hardware.peak_for(device)
        info.update({
            "driver": _nvidia_driver(),
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": props.total_memory / 2 ** 30,
            "tf32_convolutions": torch.backends.cudnn.allow_tf32,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "peak": None if peak is None else {**peak.__dict__, "source": "datasheet, dense"},
        })
    return info


def slug(info: dict) -> str:
    """A file-name-safe name of the device, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc-2t'."""
    if info["device_type"] == "cpu":
        name = f"cpu-{info['cpu']}-{info['torch_threads']}t"
    else:
        name = info["device"]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def describe(info: dict) -> list[str]:
    """The environment as the few lines printed above the tables."""
    lines = [f"device   {info['device']} ({info['device_type']})"]
    if info["device_type"] == "cuda":
        lines.append(f"         driver {info['driver']}, CUDA {info['cuda_runtime']}, cuDNN {info['cudnn']}, "
                     f"sm_{info['compute_capability'].replace('.', '')}, {info['multiprocessors']} SMs, "
                     f"{info['memory_gib']:.0f} GiB; tf32 convolutions {info['tf32_convolutions']}, "
                     f"tf32 matmul {info['tf32_matmul']}")
        peak = info.get("peak")
        lines.append("peak     " + (
            f"{peak['name']}: {peak['bf16_tflops']} bf16 / {peak['tf32_tflops']} tf32 / "
            f"{peak['fp32_tflops']} fp32 TFLOP/s, {peak['memory_tbps']} TB/s (datasheet, dense)"
            if peak else "unknown for this GPU: no % of peak"))
        ceilings = info.get("ceilings")
        if ceilings:
            lines.append(f"measured copy {ceilings['copy_tbps']:.2f} TB/s, bf16 GEMM "
                         f"{ceilings['bf16_gemm_tflops']:.0f} TFLOP/s")
    else:
        lines.append("peak     unknown for CPUs: no % of peak or roofline")
    lines.append(f"host     {info['cpu']}, {info['cpu_affinity']} usable cores, torch threads "
                 f"{info['torch_threads']}")
    lines.append(f"software python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
                 f"sr3fast {info['sr3fast']} ({info['sr3fast_commit']})")
    if info.get("triton_autotune") == "pinned":
        lines.append("triton   autotuning pinned (SR3FAST_TRITON_AUTOTUNE=pinned): each kernel runs its "
                     "first config, untuned")
    return lines


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    """The kernel driver's version (e.g. 580.159.04), not the CUDA API level torch reports."""
    try:
        match = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.splitlines()[0].strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _git_commit() -> str | None:
    """Short commit of the sr3fast checkout, '+dirty' when the work tree differs from it."""
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True,
                                  timeout=20, check=True).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None
