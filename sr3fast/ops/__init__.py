"""The fused ops the model calls, each routed to a backend (see sr3fast.backends).

One file per op: its argument checks, shared by every backend, and the dispatch. Backend
implementations live in `sr3fast.ops.triton.<op>` (Triton, kernels/) and
`sr3fast.ops.extension.<op>` (the compiled extension, csrc/); the reference is
`sr3fast.reference.<op>`.
"""
from .attention import attention
from .conv2d import conv2d
from .groupnorm_silu import groupnorm_silu
from .reverse_step import reverse_step

__all__ = ["attention", "conv2d", "groupnorm_silu", "reverse_step"]
