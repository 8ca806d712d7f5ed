"""The compiled extension's ops (csrc/): `sr3fast.ops.extension.<op>.<op>`.

Each module here imports `sr3fast._C` (which registers the C++ ops as torch.ops.sr3fast.*) and
adds what PyTorch 2 needs around them: a fake (meta) kernel for torch.compile / export, and
autograd where the op is differentiable.
"""
import torch


def has_cuda_kernels() -> bool:
    """Whether sr3fast._C was built with its CUDA kernels (importing it if needed)."""
    import sr3fast._C  # noqa: F401  (registers the ops)
    return torch._C._dispatch_has_kernel_for_dispatch_key("sr3fast::groupnorm_silu", "CUDA")
