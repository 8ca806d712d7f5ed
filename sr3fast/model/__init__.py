"""The SR3 model: configurations, the two U-Nets (public-checkpoint and paper), presets, build().

    from sr3fast.model import build
    model = build("public-16-128")            # or an SR3Config, or its dict
    eps = model.predict_noise(x, y_t, gamma)  # f(x, y_t, g)
"""
from __future__ import annotations

from .config import SR3Config, UNetConfig
from .paper_unet import PaperUNet
from .presets import get_preset, presets
from .public_unet import PublicUNet
from .sr3 import SR3


def build(config_or_name: "SR3Config | str | dict") -> SR3:
    """An SR3 model (random weights, on the default device) from a preset name, an SR3Config or
    its dict. Build under `with torch.device("meta"):` to get the structure without memory."""
    if isinstance(config_or_name, str):
        config = get_preset(config_or_name)
    elif isinstance(config_or_name, dict):
        config = SR3Config.from_dict(config_or_name)
    elif isinstance(config_or_name, SR3Config):
        config = config_or_name
    else:
        raise TypeError(f"build() takes a preset name, an SR3Config or its dict, got "
                        f"{type(config_or_name).__name__}")
    return SR3(config)


__all__ = ["UNetConfig", "SR3Config", "SR3", "PublicUNet", "PaperUNet", "presets", "get_preset", "build"]
