"""The harness checks its own arithmetic: FLOP and fused-floor byte counts of a toy U-Net piece
whose numbers can be written down by hand, and the timing statistics. Run with `pytest bench/`."""
from __future__ import annotations

import math

import torch
from torch import nn

from bench.counting import count_step
from bench.timing import Timing
from sr3fast import ops


class _ConvAttentionConv(nn.Module):
    """conv3x3(6->C) -> groupnorm_silu -> qkv conv1x1 -> attention -> add -> conv1x1(C->3)."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(6, channels, 3, padding=1)
        self.norm = nn.GroupNorm(4, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, 3, 1)

    def predict_noise(self, x, y_t, gamma):
        h = self.conv(torch.cat([x, y_t], dim=1))
        h = ops.groupnorm_silu(h, 4, self.norm.weight, self.norm.bias)
        batch, channels, height, width = h.shape
        q, k, v = self.qkv(h).reshape(batch, 3, 1, channels, height * width).transpose(-1, -2).unbind(1)
        attended = ops.attention(q, k, v).transpose(-1, -2).reshape(h.shape)
        return self.out(h + attended)


def test_counts_match_hand_arithmetic():
    batch, size, channels = 2, 8, 8
    model = _ConvAttentionConv(channels).to("meta")
    counts = count_step(model, batch, size)
    pixels, length = size * size, size * size
    macs_per_pixel = 6 * channels * 9 + channels * 3 * channels + channels * 3
    assert counts.flops == 2 * batch * pixels * macs_per_pixel + 4 * batch * length * length * channels
    assert counts.parameter_elements == sum(p.numel() for p in model.parameters())
    # reads: conv input, qkv input, q and k, v, output conv input; the scores never
    assert counts.read_elements == batch * pixels * (6 + channels + 2 * channels + channels + channels)
    # writes: conv, qkv, attention output, output conv; the scores never
    assert counts.written_elements == batch * pixels * (channels + 3 * channels + channels + 3)
    total = counts.parameter_elements + counts.read_elements + counts.written_elements
    assert counts.bytes(torch.bfloat16) == 2 * total


def test_timing_statistics():
    timing = Timing(samples_ms=(4.0, 1.0, 3.0, 2.0, 100.0), warmup=2)
    assert timing.median_ms == 3.0
    assert timing.quartiles_ms == (2.0, 4.0)
    assert (timing.min_ms, timing.max_ms, timing.repeats) == (1.0, 100.0, 5)
    single = Timing(samples_ms=(7.5,), warmup=1)
    assert single.quartiles_ms == (7.5, 7.5) and math.isclose(single.median_ms, 7.5)
