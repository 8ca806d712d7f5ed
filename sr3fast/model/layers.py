"""Building blocks shared by both U-Nets: noise-level embedding, fused norm calls, self-attention,
convolutions.

Every GroupNorm→SiLU pair runs as one `ops.groupnorm_silu` call, every convolution as
`ops.conv2d`. The nn.GroupNorm modules stay in the module tree only as holders of their weight,
bias, group count and eps, so parameter names and shapes match the public checkpoints.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


def norm_act(norm: nn.GroupNorm, x: torch.Tensor, shift: torch.Tensor | None = None,
             act: bool = True) -> torch.Tensor:
    """SiLU(GroupNorm(x + shift)) with `norm`'s parameters, as one fused op (act=False: no SiLU)."""
    return ops.groupnorm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, shift=shift, act=act)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, keys and maths) run through `ops.conv2d`, so that the selected
    backend runs it: on the CPU backend with prepacked oneDNN weights and channels-last
    activations (sr3fast.ops.extension.conv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ops.conv2d covers the U-Net's convolutions; any other kind runs as nn.Conv2d does
        if (self.padding_mode != "zeros" or self.dilation != (1, 1) or self.groups != 1
                or isinstance(self.padding, str)):
            return super().forward(x)
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding)


def check_input(x: torch.Tensor, config) -> None:
    """Shape checks of a U-Net input against its UNetConfig (metadata only: no device sync)."""
    if x.dim() != 4 or x.shape[1] != config.in_channel:
        raise ValueError(f"U-Net input must have shape (B, {config.in_channel}, H, W), got {tuple(x.shape)}")
    multiple = config.size_multiple
    if x.shape[-2] % multiple or x.shape[-1] % multiple:
        raise ValueError(f"U-Net input height and width must be divisible by {multiple} (it downsamples "
                         f"{config.levels - 1} times), got {x.shape[-2]}x{x.shape[-1]}; pad or resize the image")


def noise_level_vector(noise_level: torch.Tensor, batch: int) -> torch.Tensor:
    """The noise level as shape (batch,): accepts (B,), (B, 1) (what the public sampler passes) or a scalar."""
    if noise_level.dim() == 0 or noise_level.numel() == 1:
        return noise_level.reshape(1).expand(batch)
    if noise_level.numel() != batch or noise_level.dim() > 2:
        raise ValueError(f"noise_level must have shape ({batch},) or ({batch}, 1), one level per sample; "
                         f"got {tuple(noise_level.shape)}")
    return noise_level.reshape(batch)


class NoiseLevelEncoding(nn.Module):
    """Sinusoidal features of the noise level sqrt(g) (WaveGrad's encoding, used by SR3):

        e_i = level · 10000^(-i/n),  i = 0..n-1,  n = dim // 2;   features = [sin(e), cos(e)].

    Computed in at least float32 whatever the model's dtype: sqrt(g) sits close to 1 for most of
    the schedule, where bf16 could not tell neighbouring steps apart.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        count = self.dim // 2
        dtype = torch.promote_types(noise_level.dtype, torch.float32)
        step = torch.arange(count, dtype=dtype, device=noise_level.device) / count
        angles = noise_level.to(dtype).unsqueeze(-1) * torch.exp(-math.log(1e4) * step)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def embed_noise_level(mlp: nn.Sequential, noise_level: torch.Tensor) -> torch.Tensor:
    """Run `mlp` = (NoiseLevelEncoding, Linear, ...) on (B,) levels; the (at least float32)
    encoding is cast to the first Linear's dtype."""
    encoding, first, *rest = mlp
    h = first(encoding(noise_level).to(first.weight.dtype))
    for layer in rest:
        h = layer(h)
    return h


class SelfAttention(nn.Module):
    """One-head self-attention over all H·W positions, with a pre-norm and a residual:

        out = (x + W_o · softmax(q kᵀ / sqrt(C)) v) · residual_scale,   q, k, v = W_qkv · GroupNorm(x)

    Submodules as in the public SR3 code: `norm` (GroupNorm), `qkv` (1x1 conv to 3C, no bias;
    q, k, v are its channel thirds in that order), `out` (1x1 conv). q, k and v reach
    `ops.attention` as strided (B, 1, H·W, C) views of the qkv output, without copies.
    """

    def __init__(self, in_channel: int, norm_groups: int = 32, residual_scale: float = 1.0):
        super().__init__()
        self.residual_scale = residual_scale
        self.norm = nn.GroupNorm(norm_groups, in_channel)
        self.qkv = Conv2d(in_channel, in_channel * 3, 1, bias=False)
        self.out = Conv2d(in_channel, in_channel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(norm_act(self.norm, x, act=False))
        # (B, 3C, H, W) -> three (B, 1, HW, C) views; strides follow qkv's memory format
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).split(channels, dim=-1)
        attended = ops.attention(q, k, v, 1.0 / math.sqrt(channels))
        # (B, 1, HW, C) -> (B, C, H, W): a view, channels-last in memory
        attended = attended.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        h = self.out(attended) + x
        return h if self.residual_scale == 1.0 else h * self.residual_scale


def unet_levels(config, block, downsample, upsample) -> tuple[list, list, list, int]:
    """The module lists of a DDPM-style U-Net, shared by both variants: `downs` = per level
    `res_blocks` blocks, then a downsampler (not after the last level); `mid` = a block with
    attention, then one without; `ups` = per level from the deepest, `res_blocks + 1` blocks each
    taking the concatenation [h, skip], then an upsampler (not after level 0). Also returns the
    channel count of the last up block. Skips are the input conv's output (inner_channel
    channels) and every down module's.

    block(dim, dim_out, with_attn), downsample(dim), upsample(dim) make the modules.
    """
    inner, resolutions = config.inner_channel, config.resolutions()
    channels, skip_channels = inner, [inner]
    downs = []
    for level, mult in enumerate(config.channel_mults):
        for _ in range(config.res_blocks):
            downs.append(block(channels, inner * mult, resolutions[level] in config.attn_res))
            channels = inner * mult
            skip_channels.append(channels)
        if level != config.levels - 1:
            downs.append(downsample(channels))
            skip_channels.append(channels)
    mid = [block(channels, channels, True), block(channels, channels, False)]
    ups = []
    for level in reversed(range(config.levels)):
        for _ in range(config.res_blocks + 1):
            out = inner * config.channel_mults[level]
            ups.append(block(channels + skip_channels.pop(), out, resolutions[level] in config.attn_res))
            channels = out
        if level != 0:
            ups.append(upsample(channels))
    return downs, mid, ups, channels
