"""Which implementation runs each fused op: selection, availability and per-op resolution.

Backends:
  reference  pure PyTorch, fp32 maths, always available (the test oracle)
  triton     Triton kernels (kernels/): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  cuda       the compiled extension's CUDA kernels (csrc/)
  cpu        the compiled extension's CPU kernels (csrc/)
  auto       (default) per op and device, the first available backend in `PREFERENCE` that
             implements the op

Selection: `set_backend(name)`, `with backend(name):`, or the SR3FAST_BACKEND environment
variable as the default. Forcing a backend that is unavailable raises `BackendUnavailable`
saying why; it never falls back silently. A forced backend that is available but does not
implement one op (the cuda backend has no attention kernel, say) runs the reference for that
op, and `explain_backend()` shows it. The cpu backend's attention is torch's fused CPU kernel
(sr3fast/ops/extension/attention.py), which never stores the L×L scores.

Importing this module imports neither torch nor triton and touches no GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from contextlib import contextmanager
from functools import lru_cache

NAMES = ("reference", "triton", "cuda", "cpu")
OPS = ("groupnorm_silu", "attention", "reverse_step", "conv2d")

# auto's order of preference per device type: fastest first. On CUDA the extension's kernels
# come first where they exist (groupnorm_silu, reverse_step): on an H200 (2026-11-30, eager
# calls, bench/results/gpu-h200-2026-11-30.json) they took 5-23 us per call against 58-259 us
# for the Triton launchers, whose Python dispatch costs more than their kernels at SR3's sizes.
# Attention has no CUDA kernel, so Triton runs it.
PREFERENCE = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
# where each backend's implementation of op `name` lives: module f"{prefix}.{name}", attribute `name`
_IMPL_PACKAGE = {
    "triton": "sr3fast.ops.triton",
    "cuda": "sr3fast.ops.extension",
    "cpu": "sr3fast.ops.extension",
}
_ENV = "SR3FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """A backend was forced that cannot run here; the message says why and what to do."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in ("auto", *NAMES):
        raise ValueError(f"unknown sr3fast backend {name!r}; choose one of: auto, {', '.join(NAMES)}")
    return name.lower()


def _initial() -> str:
    value = os.environ.get(_ENV, "auto").strip() or "auto"
    try:
        return _check_name(value)
    except ValueError as err:
        raise ValueError(f"{_ENV}={value!r}: {err}") from None


_selected = _initial()


def get_backend() -> str:
    """The current selection: 'auto' or a backend name."""
    return _selected


def set_backend(name: str) -> None:
    """Select the backend for all ops ('auto', 'reference', 'triton', 'cuda', 'cpu').

    Raises BackendUnavailable when the backend cannot run on any device of this machine."""
    global _selected
    name = _check_name(name)
    if name != "auto":
        reasons = [unavailable_reason(name, device) for device in PREFERENCE]
        if all(reasons):
            raise BackendUnavailable(f"sr3fast backend {name!r} is not available: " + "; ".join(
                f"on {device}: {why}" for device, why in zip(PREFERENCE, reasons)))
    _selected = name
    _resolve.cache_clear()


@contextmanager
def backend(name: str):
    """Use backend `name` inside the block, then restore the previous selection."""
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _extension_error() -> str | None:
    """None when sr3fast._C imports, else why not."""
    import torch  # noqa: F401  (loads libc10/libtorch, which sr3fast._C links against)
    try:
        importlib.import_module("sr3fast._C")
    except ImportError as err:
        return (f"the compiled extension sr3fast._C is not built ({err}); reinstall with "
                "`pip install --no-build-isolation -e .` and a C++ compiler (SR3FAST_SKIP_EXT unset)")
    return None


@lru_cache(maxsize=None)
def unavailable_reason(name: str, device_type: str) -> str | None:
    """None when backend `name` can run ops on tensors of `device_type`, else the reason."""
    if name == "reference":
        return None
    if device_type not in PREFERENCE:
        return f"sr3fast has no {name} kernels for {device_type} tensors"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (slow; for tests)"
        if device_type == "cuda" and not _cuda_available():
            return "no CUDA device is visible to torch"
        return None
    if name in ("cpu", "cuda"):
        if name != device_type:
            return f"the {name} backend runs {name} tensors, not {device_type} tensors"
        error = _extension_error()
        if error:
            return error
        if name == "cuda":
            if not _cuda_available():
                return "no CUDA device is visible to torch"
            from .ops import extension
            if not extension.has_cuda_kernels():
                return ("sr3fast._C was built without CUDA kernels; rebuild with a CUDA toolkit "
                        "(CUDA_HOME) and SR3FAST_SKIP_CUDA unset")
        return None
    raise AssertionError(name)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _implementation_of(name: str, op: str):
    """Backend `name`'s function for `op`, or None if that backend does not implement it."""
    if name == "reference":
        from . import reference
        return getattr(reference, op)
    module_name = f"{_IMPL_PACKAGE[name]}.{op}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name in (module_name, _IMPL_PACKAGE[name]):
            return None
        raise
    function = getattr(module, op, None)
    # A function may serve only some of the backends that share its package (`backends`).
    if function is not None and name not in getattr(function, "backends", (name,)):
        return None
    return function


def implements(name: str, op: str) -> bool:
    """Whether backend `name` has its own kernel for `op` (availability on a device aside)."""
    return _implementation_of(_check_name(name), op) is not None


@lru_cache(maxsize=None)
def _resolve(op: str, device_type: str, selected: str) -> tuple[str, str]:
    """(backend name, why) for `op` on `device_type` under selection `selected`."""
    if selected != "auto":
        why = unavailable_reason(selected, device_type)
        if why:
            raise BackendUnavailable(
                f"sr3fast backend {selected!r} was selected but cannot run {op} on {device_type} "
                f"tensors: {why}. Select another with sr3fast.set_backend('auto') or {_ENV}.")
        if _implementation_of(selected, op) is None:
            return "reference", f"selected {selected!r} has no {op} kernel; the reference runs it"
        return selected, "selected"
    passed_over = []
    for name in PREFERENCE.get(device_type, ("reference",)):
        why = unavailable_reason(name, device_type)
        if why is None and _implementation_of(name, op) is None:
            why = f"it has no {op} kernel"
        if why is None:
            note = "fastest available" + (f" (passed over: {'; '.join(passed_over)})" if passed_over else "")
            return name, note
        passed_over.append(f"{name}: {why}")
    raise AssertionError("the reference backend is always available")


def resolve(op: str, device_type: str) -> str:
    """The backend that runs `op` for tensors on `device_type` now."""
    return _resolve(op, device_type, _selected)[0]


def implementation(op: str, device_type: str):
    """The function that runs `op` for tensors on `device_type` under the current selection."""
    return _implementation_of(resolve(op, device_type), op)


def explain_backend(device: str = "cpu") -> str:
    """A readable account of which backend runs each op on `device`, and why."""
    device_type = str(device).split(":")[0]
    lines = [f"sr3fast backend selection: {_selected!r} (device {device_type})"]
    for op in OPS:
        try:
            name, why = _resolve(op, device_type, _selected)
            lines.append(f"  {op:15s} -> {name:9s} {why}")
        except BackendUnavailable as err:
            lines.append(f"  {op:15s} -> error: {err}")
    return "\n".join(lines)
