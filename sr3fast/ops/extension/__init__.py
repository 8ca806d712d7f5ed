"""The compiled extension's ops (csrc/): `sr3fast.ops.extension.<op>.<op>`."""
import torch


def has_cuda_kernels() -> bool:
    """Whether sr3fast._C was built with its CUDA kernels (import it first)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("sr3fast::groupnorm_silu", "CUDA")
