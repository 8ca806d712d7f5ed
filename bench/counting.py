"""FLOPs and the minimal memory traffic of one U-Net step, counted from the model itself.

One forward pass runs on the meta device (shapes only, no data, no time) through the reference
backend, so every op decomposes into plain aten ops that both counters understand. The counts
are properties of the U-Net, not of an implementation: every row of a configuration and batch
divides by the same numbers.

FLOPs: matrix products and convolutions as torch.utils.flop_counter.FlopCounterMode counts them
(2 per multiply-add; attention's two products included). Elementwise work, normalisation and
softmax are left out: they are bandwidth work, a few per cent of the FLOPs at most.

Bytes, the "fused floor": what a layer-by-layer implementation that fuses everything it can
must still move through device memory, at the row's dtype:
  * every parameter and buffer read once per step (not once per sample);
  * every convolution and matrix product reads its activation operands once and writes its
    output once;
  * everything between two of those (normalisation, SiLU, residual adds, the noise-level bias,
    the skip concatenations) is taken as fused into their reads and writes, free;
  * attention's Lq x Lk scores and probabilities stay on chip (flash attention), so the two
    attention products count q, k, v and the output only.
It is a lower bound on traffic, so "% of roofline" is never flattered by it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import sr3fast

aten = torch.ops.aten
# The ops whose operands and results cross device memory in the fused-floor model.
_ANCHORS = {
    aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten.baddbmm.default,
}


@dataclass(frozen=True)
class Counts:
    """Work of one U-Net step: FLOPs, and the fused-floor traffic in elements (see module doc)."""
    flops: int
    parameter_elements: int
    read_elements: int
    written_elements: int

    def bytes(self, dtype: torch.dtype) -> int:
        """Fused-floor traffic with every tensor stored in `dtype`."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return (self.parameter_elements + self.read_elements + self.written_elements) * itemsize


class _FusedFloor(TorchDispatchMode):
    """Tallies the fused-floor traffic of the aten ops it sees (see the module docstring)."""

    def __init__(self, parameter_storages: set[int]):
        super().__init__()
        self.parameter_storages = parameter_storages  # counted apart, once per step
        self.read_elements = 0
        self.written_elements = 0
        # Tensors derived from an activation-by-activation product: attention scores and
        # everything computed from them up to the product with v. They never reach memory.
        # Keyed by id with a weak reference to tell a live tensor from a reused id (a WeakSet
        # would compare tensors with ==, which is elementwise).
        self._on_chip: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _tensors(args) + _tensors(kwargs.values())
        outputs = _tensors(out if isinstance(out, (tuple, list)) else (out,))
        if func in _ANCHORS:
            self._anchor(inputs, outputs)
        elif any(self._is_on_chip(t) for t in inputs):
            self._keep_on_chip(outputs)
        return out

    def _is_on_chip(self, tensor: torch.Tensor) -> bool:
        ref = self._on_chip.get(id(tensor))
        return ref is not None and ref() is tensor

    def _keep_on_chip(self, tensors) -> None:
        for tensor in tensors:
            self._on_chip[id(tensor)] = weakref.ref(tensor)

    def _anchor(self, inputs, outputs):
        activations = [t for t in inputs if t.untyped_storage()._cdata not in self.parameter_storages]
        scores = [t for t in activations if self._is_on_chip(t)]
        self.read_elements += sum(t.numel() for t in activations if not self._is_on_chip(t))
        if len(activations) >= 2 and not scores:
            self._keep_on_chip(outputs)  # q kᵀ: the scores stay on chip
        else:
            self.written_elements += sum(t.numel() for t in outputs)


def _tensors(values) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor)]


def count_step(model: torch.nn.Module, batch: int, image_size: int, channels: int = 3) -> Counts:
    """Counts of one `model.predict_noise` call at `batch` x `channels` x `image_size`^2.

    `model` must live on the meta device: shapes are all that is computed."""
    x = torch.randn(batch, channels, image_size, image_size, device="meta")
    y_t = torch.randn_like(x)
    gamma = torch.rand(batch, device="meta")
    storages = {t.untyped_storage()._cdata: t for t in (*model.parameters(), *model.buffers())}
    parameter_elements = sum(t.untyped_storage().nbytes() // t.element_size() for t in storages.values())
    flop_counter = FlopCounterMode(display=False)
    floor = _FusedFloor(set(storages))
    with sr3fast.backend("reference"), torch.no_grad(), flop_counter, floor:
        model.predict_noise(x, y_t, gamma)
    return Counts(flops=flop_counter.get_total_flops(), parameter_elements=parameter_elements,
                  read_elements=floor.read_elements, written_elements=floor.written_elements)
