"""Back-projection: make a super-resolved image agree with the low-resolution input it came from.

The paper measures consistency, the MSE between the output downsampled the way the input was
made (bicubic with antialiasing) and the input. A sampled image matches its input only as well
as the network learned to; iterative back-projection (Irani and Peleg 1991) removes what is
left: y <- y + U(x - D(y)), with D that downsampling and U bicubic upsampling. Each step moves
only the low frequencies D sees (the range-space correction of DDNM, Wang et al. 2023); the
detail the model generated, which D cannot see, stays.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _bicubic(images: torch.Tensor, size) -> torch.Tensor:
    # antialias=True: PIL's kernel (a = -0.5), the one the inputs were made with
    return F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)


def back_project(output: torch.Tensor, low: torch.Tensor, iterations: int) -> torch.Tensor:
    """`output` (B, C, H, W) moved `iterations` back-projection steps toward agreeing with `low`
    (B, C, h, w), both in [0, 1] (float32 or wider); returns [0, 1] values."""
    if iterations < 0:
        raise ValueError(f"back-projection iterations must be >= 0, got {iterations}")
    if output.shape[:2] != low.shape[:2]:
        raise ValueError(f"back_project: output {tuple(output.shape)} and input {tuple(low.shape)} "
                         "differ in batch or channels")
    high_size, low_size = output.shape[-2:], low.shape[-2:]
    result = output
    for _ in range(iterations):
        result = (result + _bicubic(low - _bicubic(result, low_size), high_size)).clamp(0, 1)
    return result
