"""sr3fast: SR3 diffusion super-resolution (Saharia et al. 2021) run through fused kernels.

    import sr3fast
    model = sr3fast.load("public-16-128")                # preset, sr3fast checkpoint or public *_gen.pth
    eps = model.predict_noise(x, y_t, gamma)           # f(x, y_t, g)
    y = sr3fast.upscale(image, model=model, steps=100, seed=0)

Importing this package is cheap: it imports no torch, builds nothing and queries no GPU.
Everything below is loaded on first use.
"""
from importlib import import_module

from .backends import backend, explain_backend, get_backend, set_backend

__version__ = "0.1.0"       # the one place of truth: setup.py reads it

# public name -> (module that defines it, attribute; None for the module itself), imported on
# first attribute access (PEP 562)
_LAZY = {
    "load": ("sr3fast.api", "load"),
    "upscale": ("sr3fast.api", "upscale"),
    "save": ("sr3fast.api", "save"),
    "cascade": ("sr3fast.cascades", "cascade"),
    "SR3": ("sr3fast.model", "SR3"),
    "presets": ("sr3fast.model", "presets"),
    "accelerate": ("sr3fast.acceleration", "accelerate"),
    "export": ("sr3fast.export", None),
    "diffusion": ("sr3fast.diffusion", None),
    "ops": ("sr3fast.ops", None),
    "reference": ("sr3fast.reference", None),
}

__all__ = ["backend", "explain_backend", "get_backend", "set_backend", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'sr3fast' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
