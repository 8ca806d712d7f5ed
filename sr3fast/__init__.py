"""sr3fast: SR3 diffusion super-resolution (Saharia et al. 2021) run through fused kernels.

    import sr3fast
    model = sr3fast.load("public-16-128")                # preset, sr3fast checkpoint or public *_gen.pth
    eps = model.predict_noise(x, y_t, gamma)           # f(x, y_t, g)
    y = sr3fast.upscale(image, model=model, steps=100, seed=0)

Importing this package is cheap: it imports torch, nothing else heavy, builds nothing and
queries no GPU. Everything below is loaded on first use.
"""
from importlib import import_module

from .backends import backend, explain_backend, get_backend, set_backend

__version__ = "0.1.0"

# public name -> module that defines it (imported on first attribute access, PEP 562)
_LAZY = {
    "load": "sr3fast.api",
    "upscale": "sr3fast.api",
    "save": "sr3fast.api",
    "SR3": "sr3fast.model",
    "presets": "sr3fast.model",
    "accelerate": "sr3fast.accelerate",
    "ops": "sr3fast.ops",
    "reference": "sr3fast.reference",
}

__all__ = ["backend", "explain_backend", "get_backend", "set_backend", *_LAZY]


def __getattr__(name):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'sr3fast' has no attribute {name!r}")
    module = import_module(module_name)
    value = module if module.__name__ == f"sr3fast.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
