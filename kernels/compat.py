"""What differs between the torch and Triton versions sr3fast supports (torch 2.11 / Triton 3.6, the
GPU machine's, up to torch 2.14 / Triton 3.8), decided by feature detection, not version strings.

Both differences below concern only the CPU interpreter (TRITON_INTERPRET=1); on a GPU
`wrap_triton` is torch's own and the interpreter is not used.

  - `wrap_triton`: torch 2.11's rejects an interpreted kernel (TRITON_INTERPRET=1 makes
    `@triton.jit` return an InterpretedFunction) with "wrap_triton only works on functions
    annotated with triton.jit or triton.autotune"; later torch returns such a kernel unwrapped
    (it launches eagerly and has nothing to trace). This `wrap_triton` does the same everywhere.
  - Loop bounds: Triton 3.6's interpreter turns a scalar kernel argument into a Python int with
    `int(one_element_1d_array)`, which NumPy 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"), so `for i in range(0, n, BLOCK)` over an argument n fails.
    Where the interpreter has that defect, `_fix_interpreter_index` makes it take the element
    (Triton 3.8 squeezes the array itself).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def _interpreted(kernel: Any) -> bool:
    """Whether `kernel` is an interpreted Triton kernel, or autotuners/heuristics around one."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    seen = set()
    while not isinstance(kernel, InterpretedFunction):
        inner = getattr(kernel, "fn", None)  # Autotuner and Heuristics keep what they wrap in .fn
        if inner is None or id(kernel) in seen:
            return False
        seen.add(id(kernel))
        kernel = inner
    return True


def wrap_triton(kernel: Callable) -> Any:
    """`torch.library.wrap_triton`, except that an interpreted kernel comes back as it is."""
    if _interpreted(kernel):
        return kernel
    return torch.library.wrap_triton(kernel)


def _fix_interpreter_index() -> bool:
    """Make the interpreter's tensor.__index__ take the one element of a scalar, where it cannot
    (see the module docstring). Returns whether it patched. Probes the interpreter's own patch on a
    stand-in class, so a Triton that already does it, or lays its interpreter out differently, is
    left alone."""
    try:
        import numpy as np
        from triton.runtime import interpreter
        patch_tensor, scope_type = interpreter._patch_lang_tensor, interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return False

    class Probe:
        handle = type("Handle", (), {"data": np.array([3], dtype=np.int32)})()

    try:
        scope = scope_type()
        patch_tensor(Probe, scope)
        try:
            if Probe().__index__() == 3:
                return False
        except TypeError:
            pass
        finally:
            scope.restore()
    except Exception:  # an interpreter laid out differently: not ours to patch
        return False

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


_fix_interpreter_index()
