"""The U-Net of the widely used public SR3 PyTorch code, built from sr3fast's fused ops.

Module tree, parameter names and shapes are those of that code's `model/sr3_modules/unet.py`, so
its checkpoints load one to one (keys `denoise_fn.X` there are `unet.X` in sr3fast.SR3), and the
outputs are the same functions of the same weights. What changes is how it runs:

- every GroupNorm→Swish pair is one `ops.groupnorm_silu` call;
- the per-block noise-level bias is fused into block2's norm as its `shift`, never a separate add;
- attention is `ops.attention` on strided views of the qkv convolution's output.

Block constructors take the same arguments as their public counterparts (named in each
docstring), so a public module can also be rebuilt block by block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .layers import (Conv2d, NoiseLevelEncoding, SelfAttention, check_input, embed_noise_level,
                     noise_level_vector, norm_act, unet_levels)


class ConvBlock(nn.Module):
    """GroupNorm → SiLU → Dropout → 3x3 conv (public `Block`), with an optional per-sample
    `shift` added before the norm. `block` holds [GroupNorm, SiLU, Dropout|Identity, Conv2d] so the
    parameter keys are `block.0.*` and `block.3.*`; the SiLU at index 1 is a placeholder (the fused
    op applies it)."""

    def __init__(self, dim: int, dim_out: int, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(groups, dim),
            nn.SiLU(),
            nn.Dropout(dropout) if dropout else nn.Identity(),
            Conv2d(dim, dim_out, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        norm, _, dropout, conv = self.block
        return conv(dropout(norm_act(norm, x, shift)))


class NoiseBias(nn.Module):
    """Per-channel bias from the noise-level embedding (public `FeatureWiseAffine`, additive
    form): (B, emb) -> (B, C). Its Linear sits at `noise_func.0` as in the public code."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.noise_func = nn.Sequential(nn.Linear(in_channels, out_channels))

    def forward(self, noise_embed: torch.Tensor) -> torch.Tensor:
        return self.noise_func(noise_embed)


class ResnetBlock(nn.Module):
    """h = block1(x); h = block2(h + bias(t)); out = h + res_conv(x)  (public `ResnetBlock`).

    The bias add is fused into block2's groupnorm_silu. res_conv is a 1x1 conv when the channel
    count changes, else the identity."""

    def __init__(self, dim: int, dim_out: int, noise_level_emb_dim: int, dropout: float = 0.0,
                 norm_groups: int = 32):
        super().__init__()
        self.noise_func = NoiseBias(noise_level_emb_dim, dim_out)
        self.block1 = ConvBlock(dim, dim_out, groups=norm_groups)
        self.block2 = ConvBlock(dim_out, dim_out, groups=norm_groups, dropout=dropout)
        self.res_conv = Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, noise_embed: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        h = self.block2(h, shift=self.noise_func(noise_embed))
        return h + self.res_conv(x)


class ResnetBlockWithAttention(nn.Module):
    """A ResnetBlock, then SelfAttention when `with_attn` (public `ResnetBlocWithAttn`)."""

    def __init__(self, dim: int, dim_out: int, *, noise_level_emb_dim: int, norm_groups: int = 32,
                 dropout: float = 0.0, with_attn: bool = False):
        super().__init__()
        self.with_attn = with_attn
        self.res_block = ResnetBlock(dim, dim_out, noise_level_emb_dim, dropout=dropout, norm_groups=norm_groups)
        if with_attn:
            self.attn = SelfAttention(dim_out, norm_groups=norm_groups)

    def forward(self, x: torch.Tensor, noise_embed: torch.Tensor) -> torch.Tensor:
        x = self.res_block(x, noise_embed)
        return self.attn(x) if self.with_attn else x


class Downsample(nn.Module):
    """3x3 conv with stride 2 (public `Downsample`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = Conv2d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (public `Upsample`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PublicUNet(nn.Module):
    """The public SR3 U-Net: eps = unet(cat[x, y_t], sqrt(g)).

    Layout (public `UNet`): `noise_level_mlp` = [encoding, Linear(C, 4C), SiLU, Linear(4C, C)];
    `downs` = input conv, then per level `res_blocks` ResnetBlockWithAttention and a Downsample
    (not after the last level), every output kept as a skip; `mid` = one block with attention,
    one without; `ups` = per level, from the deepest, `res_blocks + 1` blocks each taking the
    concatenation [h, skip], then an Upsample (not after level 0); `final_conv` = ConvBlock to
    out_channel.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if config.variant != "public":
            raise ValueError(f"PublicUNet builds the 'public' variant, got config.variant={config.variant!r}; "
                             "use sr3fast.model.PaperUNet")
        self.config = config
        inner, groups, dropout = config.inner_channel, config.norm_groups, config.dropout
        self.noise_level_mlp = nn.Sequential(
            NoiseLevelEncoding(inner), nn.Linear(inner, inner * 4), nn.SiLU(), nn.Linear(inner * 4, inner))

        def block(dim, dim_out, with_attn):
            return ResnetBlockWithAttention(dim, dim_out, noise_level_emb_dim=inner, norm_groups=groups,
                                            dropout=dropout, with_attn=with_attn)

        downs, mid, ups, channels = unet_levels(config, block, Downsample, Upsample)
        self.downs = nn.ModuleList([Conv2d(config.in_channel, inner, 3, padding=1), *downs])
        self.mid = nn.ModuleList(mid)
        self.ups = nn.ModuleList(ups)
        self.final_conv = ConvBlock(channels, config.out_channel, groups=groups)

    @property
    def size_multiple(self) -> int:
        return self.config.size_multiple

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channel, H, W), H and W divisible by size_multiple; noise_level = sqrt(g),
        shape (B,) or (B, 1). Returns (B, out_channel, H, W)."""
        check_input(x, self.config)
        t = embed_noise_level(self.noise_level_mlp, noise_level_vector(noise_level, x.shape[0]))
        skips = []
        for layer in self.downs:
            x = layer(x, t) if isinstance(layer, ResnetBlockWithAttention) else layer(x)
            skips.append(x)
        for layer in self.mid:
            x = layer(x, t)
        for layer in self.ups:
            if isinstance(layer, ResnetBlockWithAttention):
                x = layer(torch.cat((x, skips.pop()), dim=1), t)
            else:
                x = layer(x)
        return self.final_conv(x)

