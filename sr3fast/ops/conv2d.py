"""conv2d: the U-Net's 3x3 and 1x1 convolutions, routed to a backend like the fused ops.

Most of a CPU step's time is in these convolutions (about 90% of the 16->128 U-Net's), so the
CPU backend runs them its own way (sr3fast.ops.extension.conv2d); elsewhere they are
torch.nn.functional.conv2d, already the vendor library's best.
"""
from __future__ import annotations

import torch

from ._dispatch import implementation


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """x: (B, C, H, W); weight: (O, C, kh, kw); bias: (O,) or None; zero padding, no dilation,
    one group. Returns (B, O, H', W'), in channels-last memory on the CPU backend."""
    return implementation("conv2d", x.device)(x, weight, bias, stride, padding)
