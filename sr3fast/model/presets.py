"""Named SR3 configurations: the public checkpoints', the paper's (Table A.1), and small ones.

public-*  the configs shipped with the public SR3 PyTorch code (config/sr_sr3_16_128.json,
          config/sr_sr3_64_512.json); their checkpoints load into these.
paper-*   Table A.1 of Saharia et al. 2021 (channels, depth multipliers, residual blocks) with the
          'paper' U-Net. The paper gives no attention resolutions: these use DDPM's choice,
          self-attention at 16x16 (plus the middle block). Its noise schedule is T = 2000; the
          linear endpoints 1e-6 -> 1e-2 are the public configs'.
compact-4x  the architecture of the default model (sr3fast.load("default")): 4x, fully
          convolutional (no attention, so any input size costs linear time), 5.8M parameters,
          trained on 16->64 crops and run at any size, e.g. 64->256.
tiny, tiny-paper, small   for tests and benchmarks: a forward pass takes milliseconds on a CPU.
"""
from __future__ import annotations

from .config import SR3Config, UNetConfig

# the public configs' schedule (train and val alike); the paper's T = 2000
LINEAR_2000 = {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 1e-2}


def _paper(low: int, high: int, inner: int, mults: tuple, blocks: int, params: str, paper_params: str,
           norm_groups: int = 32, dropout: float = 0.0, note: str = "") -> SR3Config:
    unet = UNetConfig(variant="paper", inner_channel=inner, channel_mults=mults, attn_res=(16,),
                      res_blocks=blocks, dropout=dropout, norm_groups=norm_groups, image_size=high)
    return SR3Config(unet, dict(LINEAR_2000), low, high, description=(
        f"SR3 paper {low}->{high} (Table A.1: channels {inner}, multipliers {','.join(map(str, mults))}, "
        f"{blocks} residual blocks{note}); attention at 16x16 and in the middle; linear schedule "
        f"T=2000, 1e-6..1e-2. {params} parameters (paper: {paper_params})."))


def presets() -> dict[str, SR3Config]:
    """A fresh dict of every named configuration."""
    return {
        "public-16-128": SR3Config(
            UNetConfig(variant="public", inner_channel=64, channel_mults=(1, 2, 4, 8, 8), attn_res=(16,),
                       res_blocks=2, dropout=0.2, norm_groups=32, image_size=128),
            dict(LINEAR_2000), 16, 128,
            description="public SR3 code, config/sr_sr3_16_128.json (FFHQ faces 16->128); 97,807,491 parameters."),
        "public-64-512": SR3Config(
            UNetConfig(variant="public", inner_channel=64, channel_mults=(1, 2, 4, 8, 16), attn_res=(),
                       res_blocks=1, dropout=0.0, norm_groups=16, image_size=512),
            dict(LINEAR_2000), 64, 512,
            description="public SR3 code, config/sr_sr3_64_512.json (FFHQ faces 64->512); 155,334,339 parameters."),
        "paper-16-128": _paper(16, 128, 128, (1, 2, 4, 8, 8), 3, "560,694,531", "550M", dropout=0.2,
                               note="; dropout 0.2 as the paper uses for 16->128"),
        "paper-64-256": _paper(64, 256, 128, (1, 2, 4, 4, 8, 8), 3, "617,093,891", "625M"),
        "paper-64-512": _paper(64, 512, 64, (1, 2, 4, 8, 8, 16, 16), 3, "609,777,795", "625M"),
        "paper-256-1024": _paper(256, 1024, 16, (1, 2, 4, 8, 16, 32, 32, 32), 2, "148,737,715", "150M",
                                 norm_groups=16, note="; 16 norm groups, as 32 cannot divide 16 channels"),
        "compact-4x": SR3Config(
            UNetConfig(variant="public", inner_channel=32, channel_mults=(1, 2, 4, 4), attn_res=(), res_blocks=2,
                       norm_groups=16, image_size=64),
            dict(LINEAR_2000), 16, 64, description="the default model's architecture: 4x, fully convolutional "
                                                   "(no attention), trained on 16->64 crops, runs at any size; "
                                                   "5,801,539 parameters."),
        "tiny": SR3Config(
            UNetConfig(variant="public", inner_channel=16, channel_mults=(1, 2), attn_res=(8,), res_blocks=1,
                       norm_groups=4, image_size=16),
            dict(LINEAR_2000), 4, 16, description="public-variant toy for tests: 4->16, attention at 8x8."),
        "tiny-paper": SR3Config(
            UNetConfig(variant="paper", inner_channel=16, channel_mults=(1, 2), attn_res=(8,), res_blocks=1,
                       norm_groups=4, image_size=16),
            dict(LINEAR_2000), 4, 16, description="paper-variant toy for tests: 4->16, attention at 8x8."),
        "small": SR3Config(
            UNetConfig(variant="public", inner_channel=32, channel_mults=(1, 2, 4), attn_res=(16,), res_blocks=2,
                       norm_groups=16, image_size=64),
            dict(LINEAR_2000), 16, 64, description="public-variant small model for tests and benchmarks: "
                                                   "16->64, attention at 16x16."),
    }


def get_preset(name: str) -> SR3Config:
    """The named configuration; ValueError listing the names when there is none."""
    table = presets()
    if name not in table:
        raise ValueError(f"unknown SR3 preset {name!r}; choose one of: {', '.join(table)}")
    return table[name]
