"""The SR3 model: configurations, the two U-Nets (public-checkpoint and paper), presets, build().

    from sr3fast.model import build
    model = build("public-16-128")            # or an SR3Config, or its dict
    eps = model.predict_noise(x, y_t, gamma)  # f(x, y_t, g)

The configurations and presets are plain Python: `sr3fast presets` lists them without importing
torch. The modules (SR3, PublicUNet, PaperUNet) load on first use.
"""
from __future__ import annotations

from importlib import import_module

from .config import SR3Config, UNetConfig
from .presets import get_preset, presets

# public name -> submodule defining it, imported on first attribute access (PEP 562)
_LAZY = {"SR3": ".sr3", "PublicUNet": ".public_unet", "PaperUNet": ".paper_unet"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'sr3fast.model' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def build(config_or_name: "SR3Config | str | dict"):
    """An SR3 model (random weights, on the default device) from a preset name, an SR3Config or
    its dict. Build under `with torch.device("meta"):` to get the structure without memory."""
    from .sr3 import SR3

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
