"""Datasheet peaks of the GPUs the harness knows, and a quick measurement of the real ceilings.

Peaks are dense (no 2:4 sparsity) tensor-core rates in TFLOP/s and memory bandwidth in TB/s,
from NVIDIA's product datasheets. They are what "% of peak" divides by: a reader can check
them; a measured ceiling (also reported) shows how far below them a real copy and GEMM land.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    name: str
    bf16_tflops: float   # dense tensor-core bf16 (= fp16)
    tf32_tflops: float   # dense tensor-core tf32
    fp32_tflops: float   # CUDA-core fp32
    memory_tbps: float

    def tflops(self, dtype: torch.dtype, tf32: bool) -> tuple[float, str]:
        """(peak, its name) for matrix work in `dtype`; fp32 convolutions and matmuls run on
        tf32 tensor cores when PyTorch allows it."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.bf16_tflops, "bf16"
        if tf32:
            return self.tf32_tflops, "tf32"
        return self.fp32_tflops, "fp32"


# (substrings of torch.cuda.get_device_name, all required, lower case) -> Peak; most specific first.
_KNOWN: tuple[tuple[tuple[str, ...], Peak], ...] = (
    (("h200", "nvl"), Peak("H200 NVL", 835.5, 417.5, 60.0, 4.8)),
    (("h200",), Peak("H200 SXM", 989.4, 494.7, 67.0, 4.8)),
    (("h100", "nvl"), Peak("H100 NVL", 835.5, 417.5, 60.0, 3.9)),
    (("h100", "pcie"), Peak("H100 PCIe", 756.5, 378.0, 51.0, 2.0)),
    (("h100",), Peak("H100 SXM", 989.4, 494.7, 67.0, 3.35)),
    (("a100", "sxm", "80gb"), Peak("A100 SXM 80GB", 312.0, 156.0, 19.5, 2.039)),
    (("a100", "sxm"), Peak("A100 SXM 40GB", 312.0, 156.0, 19.5, 1.555)),
    (("a100", "80gb", "pcie"), Peak("A100 PCIe 80GB", 312.0, 156.0, 19.5, 1.935)),
    (("a100", "pcie"), Peak("A100 PCIe 40GB", 312.0, 156.0, 19.5, 1.555)),
)


def peak_for(device: torch.device) -> Peak | None:
    """The datasheet peak of `device`, or None when unknown (every CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for needles, peak in _KNOWN:
        if all(needle in name for needle in needles):
            return peak
    return None


def tf32_enabled() -> bool:
    """Whether fp32 convolutions run on tf32 tensor cores (PyTorch's default for cuDNN);
    SR3's FLOPs are almost all convolutions."""
    return bool(torch.backends.cudnn.allow_tf32)


def measure_ceilings(device: torch.device) -> dict:
    """Achieved device-to-device copy bandwidth and bf16 GEMM rate on `device` (CUDA only):
    the practical ceilings, beside the datasheet ones."""
    from .timing import Budget, measure  # local: keeps this module free of timing policy

    budget = Budget(warmup=3, min_repeats=10, max_repeats=50, target_s=0.5)
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_ms = measure(lambda: target.copy_(source), device, budget).median_ms
    copy_tbps = 2 * source.numel() / (copy_ms * 1e-3) / 1e12  # bytes read plus bytes written
    del source, target

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)  # random, never zeros
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm_ms = measure(lambda: a @ b, device, budget).median_ms
    gemm_tflops = 2 * n ** 3 / (gemm_ms * 1e-3) / 1e12
    return {"copy_tbps": copy_tbps, "bf16_gemm_tflops": gemm_tflops,
            "method": f"median of repeats: 1 GiB copy_ (read+write bytes); {n}^3 bf16 matmul on randn"}
