"""The memory layout of the extension's outputs, mirroring csrc/common/layout.cpp for the fake
kernels: an input that is contiguous or channels-last (channels innermost) is read in place and
its outputs take its exact strides; any other input is read as a contiguous copy."""
import torch


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x as the C++ kernels read it (outputs are `torch.empty_like` of this)."""
    if x.is_contiguous() or (x.dim() >= 3 and x.movedim(1, -1).is_contiguous()):
        return x
    return x.contiguous()
