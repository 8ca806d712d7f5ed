"""The U-Net the SR3 paper describes: DDPM-like, with BigGAN residual blocks and 1/sqrt(2) skips.

Saharia et al. 2021, Sec. 4 / Table A.1: "a U-Net architecture similar to DDPM ... we replace the
original DDPM residual blocks with residual blocks from BigGAN, and we re-scale skip connections
by 1/sqrt(2)". Choices the paper leaves open, and what this module does:

- BigGAN residual blocks resample *inside* the block (improved DDPM's `resblock_updown`): the
  down path ends each level but the last with a block that average-pools 2x2, the up path with
  one that upsamples nearest x2; both resample the residual branch after its first norm-act and
  the skip branch alike.
- "Skip connections" are read as the residual (identity) connections, as in NCSN++ (Song et al.
  2021, `skip_rescale`): every residual and attention block returns (skip + branch) / sqrt(2).
  The U-Net's encoder-to-decoder connections are concatenations, where a constant factor would be
  absorbed by the next convolution.
- Noise conditioning: the same sinusoidal encoding of sqrt(g) as the public code, then DDPM's MLP
  to 4·inner_channel; each block adds Linear(SiLU(emb)) per channel before its second norm, fused
  into groupnorm_silu as `shift`.
- Attention: one head, at the resolutions in attn_res, and in the middle (DDPM's res-attn-res).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .layers import (Conv2d, NoiseLevelEncoding, SelfAttention, check_input, embed_noise_level,
                     noise_level_vector, norm_act, unet_levels)

SKIP_SCALE = 1.0 / math.sqrt(2.0)


class BigGANResBlock(nn.Module):
    """Residual block with optional resampling, as in BigGAN / improved DDPM:

        h   = conv1(resample(SiLU(GN1(x))))
        h   = conv2(Dropout(SiLU(GN2(h + W·SiLU(emb)))))
        out = (skip(resample(x)) + h) / sqrt(2)

    resample: None, "down" (2x2 average pooling) or "up" (nearest x2); skip is a 1x1 conv when the
    channel count changes, else the identity. `noise_embed` arrives already through SiLU.
    """

    def __init__(self, dim: int, dim_out: int, noise_embed_dim: int, norm_groups: int,
                 dropout: float = 0.0, resample: str | None = None):
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        self.resample = resample
        self.norm1 = nn.GroupNorm(norm_groups, dim)
        self.conv1 = Conv2d(dim, dim_out, 3, padding=1)
        self.noise_proj = nn.Linear(noise_embed_dim, dim_out)
        self.norm2 = nn.GroupNorm(norm_groups, dim_out)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = Conv2d(dim_out, dim_out, 3, padding=1)
        self.skip = Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, noise_embed: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self._resample(norm_act(self.norm1, x)))
        h = norm_act(self.norm2, h, shift=self.noise_proj(noise_embed))
        h = self.conv2(self.dropout(h))
        return (self.skip(self._resample(x)) + h) * SKIP_SCALE


class ResAttnBlock(nn.Module):
    """A BigGANResBlock, then (when with_attn) self-attention with the same 1/sqrt(2) rescale."""

    def __init__(self, dim: int, dim_out: int, noise_embed_dim: int, norm_groups: int,
                 dropout: float = 0.0, with_attn: bool = False):
        super().__init__()
        self.with_attn = with_attn
        self.res = BigGANResBlock(dim, dim_out, noise_embed_dim, norm_groups, dropout)
        if with_attn:
            self.attn = SelfAttention(dim_out, norm_groups, residual_scale=SKIP_SCALE)

    def forward(self, x: torch.Tensor, noise_embed: torch.Tensor) -> torch.Tensor:
        x = self.res(x, noise_embed)
        return self.attn(x) if self.with_attn else x


class PaperUNet(nn.Module):
    """SR3's U-Net as the paper describes it: eps = unet(cat[x, y_t], sqrt(g)).

    `input_conv`; `downs` = per level `res_blocks` ResAttnBlocks, then (not after the last level)
    a downsampling BigGANResBlock; `mid` = ResAttnBlock with attention, ResAttnBlock without;
    `ups` = per level from the deepest `res_blocks + 1` ResAttnBlocks on [h, skip], then (not
    after level 0) an upsampling BigGANResBlock; `out_norm` → SiLU → `out_conv`. The skips are
    the input conv's output and every down block's, as in DDPM.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if config.variant != "paper":
            raise ValueError(f"PaperUNet builds the 'paper' variant, got config.variant={config.variant!r}; "
                             "use sr3fast.model.PublicUNet")
        self.config = config
        inner, groups, dropout = config.inner_channel, config.norm_groups, config.dropout
        embed_dim = 4 * inner
        self.noise_mlp = nn.Sequential(
            NoiseLevelEncoding(inner), nn.Linear(inner, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

        def block(dim, dim_out, with_attn):
            return ResAttnBlock(dim, dim_out, embed_dim, groups, dropout, with_attn)

        def resample(dim, direction):
            return BigGANResBlock(dim, dim, embed_dim, groups, dropout, resample=direction)

        self.input_conv = Conv2d(config.in_channel, inner, 3, padding=1)
        downs, mid, ups, channels = unet_levels(
            config, block, lambda dim: resample(dim, "down"), lambda dim: resample(dim, "up"))
        self.downs = nn.ModuleList(downs)
        self.mid = nn.ModuleList(mid)
        self.ups = nn.ModuleList(ups)

        self.out_norm = nn.GroupNorm(groups, channels)
        self.out_conv = Conv2d(channels, config.out_channel, 3, padding=1)

    @property
    def size_multiple(self) -> int:
        return self.config.size_multiple

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channel, H, W), H and W divisible by size_multiple; noise_level = sqrt(g),
        shape (B,) or (B, 1). Returns (B, out_channel, H, W)."""
        check_input(x, self.config)
        # every block applies SiLU before its projection (DDPM); done once here for all of them
        emb = F.silu(embed_noise_level(self.noise_mlp, noise_level_vector(noise_level, x.shape[0])))
        x = self.input_conv(x)
        skips = [x]
        for layer in self.downs:
            x = layer(x, emb)
            skips.append(x)
        for layer in self.mid:
            x = layer(x, emb)
        for layer in self.ups:
            if isinstance(layer, ResAttnBlock):
                x = torch.cat((x, skips.pop()), dim=1)
            x = layer(x, emb)
        return self.out_conv(norm_act(self.out_norm, x))
