"""conv2d on the CPU backend: sr3fast::conv2d (csrc/conv2d/cpu.cpp), oneDNN convolutions with the
weight reordered into oneDNN's blocked layout once per parameter instead of on every call, and
channels-last activations (the extension's groupnorm_silu reads them in place).

A plain `F.conv2d` on a CPU reorders its weight each call and converts NCHW activations on the
way in and out. The C++ op keeps the packed weight while the parameter lives and is unchanged
(an optimizer step, `load_state_dict` or `.copy_` repacks it). As an op it also runs inside
packages from `sr3fast export` and in C++ programs. The maths is oneDNN's either way; only the
order of the additions in each dot product may differ from F.conv2d.

Inference only: when autograd must record the call (training), this is F.conv2d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

import sr3fast._C  # noqa: F401  (registers torch.ops.sr3fast.*)


@torch.library.register_fake("sr3fast::conv2d")
def _conv2d_fake(x, weight, bias, stride, padding):
    batch, _, height, width = x.shape
    out_height = (height + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    out_width = (width + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
    return torch.empty((batch, weight.shape[0], out_height, out_width), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """As sr3fast.reference.conv2d; see the module docstring."""
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if (torch.is_grad_enabled() and needs_grad) or x.device.type != "cpu" or x.dim() != 4:
        return F.conv2d(x, weight, bias, stride, padding)
    return torch.ops.sr3fast.conv2d(x, weight, bias, list(_pair(stride)), list(_pair(padding)))


conv2d.backends = ("cpu",)  # the cuda backend shares this package; cuDNN needs nothing of this
