"""conv2d on the CPU backend: oneDNN convolutions with the weight reordered into oneDNN's blocked
layout once, instead of on every call, and channels-last activations.

A plain `F.conv2d` on a CPU reorders its weight into the blocked layout each call and converts
NCHW activations on the way in and out; at SR3's shapes that is more than half of the
convolution's time. Here the reordered ("prepacked") weight is cached per parameter and rebuilt
when the parameter changes (its data pointer or version counter moves: an optimizer step,
load_state_dict, `.copy_`), and activations stay channels-last from one convolution to the next
(the extension's groupnorm_silu reads them in place). The maths is oneDNN's either way; only the
order of the additions in each dot product may differ from F.conv2d.

Inference only: when autograd must record the call, under torch.compile / torch.export (inductor
prepacks frozen weights itself), or for other dtypes and devices, this is F.conv2d.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

# Parameter id -> (what the packed weight was built from, the packed weight). An entry leaves
# with its parameter (weakref.finalize), so an id is never reused with a stale entry.
_PACKED: dict[int, tuple[tuple, torch.Tensor]] = {}


def _mkldnn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


_MKLDNN = _mkldnn_available()


def _prepackable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not _MKLDNN or torch.compiler.is_compiling():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() != 4 or weight.dim() != 4:
        return False
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    return not (torch.is_grad_enabled() and needs_grad)


def _packed_weight(weight: torch.Tensor, stride: list[int], padding: list[int],
                   input_shape: tuple[int, ...]) -> torch.Tensor:
    # Inference tensors keep no version counter (nor can they change outside inference mode).
    version = -1 if weight.is_inference() else weight._version
    built_from = (weight.data_ptr(), version, tuple(weight.shape), tuple(stride), tuple(padding), input_shape)
    entry = _PACKED.get(id(weight))
    if entry is None or entry[0] != built_from:
        if entry is None:
            weakref.finalize(weight, _PACKED.pop, id(weight), None)
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight.detach(), padding, stride, [1, 1], 1, list(input_shape))
        entry = _PACKED[id(weight)] = (built_from, packed)
    return entry[1]


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """As sr3fast.reference.conv2d; see the module docstring."""
    if not _prepackable(x, weight, bias):
        return F.conv2d(x, weight, bias, stride, padding)
    stride, padding = list(_pair(stride)), list(_pair(padding))
    x = x.contiguous(memory_format=torch.channels_last)
    packed = _packed_weight(weight, stride, padding, tuple(x.shape))
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, None if bias is None else bias.detach(), padding, stride, [1, 1], 1, "none", [], "")


conv2d.backends = ("cpu",)  # the cuda backend shares this package; cuDNN needs nothing of this
