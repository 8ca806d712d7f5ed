"""How the Triton kernels choose among their configs, and the switches that bound it.

Every autotuned kernel in this package is declared with `autotune(...)` below instead of
`triton.autotune`. It behaves the same, except that the candidates left after the kernel's own
pruning are cut to the first one (the kernel's preferred config: list it first) when

  - SR3FAST_TRITON_AUTOTUNE=pinned: one compile and no timing per kernel and shape, so a test
    run or a short GPU session spends its minutes checking results, not benchmarking configs;
  - TRITON_INTERPRET=1: the CPU interpreter cannot time anything.

Both switches are read at each launch, not at import. Tests that must run every config of a
kernel (the autotuner only ever runs its pick) use `forced(kernel, config)`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

import triton

PIN_VARIABLE = "SR3FAST_TRITON_AUTOTUNE"


def pinned() -> bool:
    """Whether autotuning is pinned to each kernel's first surviving config."""
    return os.environ.get(PIN_VARIABLE, "").strip().lower() == "pinned"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def single_config() -> bool:
    return pinned() or interpreting()


def autotune(configs: list[triton.Config], key: list[str],
             prune: Callable[..., list[triton.Config]] | None = None, **kwargs):
    """`triton.autotune` whose early pruning ends with `keep`: `prune(configs, named_args,
    **kwargs)` (the kernel's own rule, optional) runs first, then the pin switches apply."""
    def early_prune(candidates, named_args, **launch_kwargs):
        if prune is not None:
            candidates = prune(candidates, named_args, **launch_kwargs)
        return keep(candidates)
    return triton.autotune(configs=configs, key=key,
                           prune_configs_by={"early_config_prune": early_prune},
                           do_bench=_timer(kwargs.pop("do_bench", None)), **kwargs)


def _timer(do_bench: Callable | None) -> Callable:
    """The autotuner's benchmarker, except under a pin switch. Triton 3.6 (the GPU's) times the
    candidates even when pruning left only one (3.8 skips that): ~125 ms of runs per kernel and
    shape, and on a CPU a crash, as the interpreter has no timer. Pinned, `keep` has left exactly
    one candidate, so its time is irrelevant: report zero without running it."""
    def timer(kernel_call, quantiles):
        if single_config():
            return [0.0 for _ in quantiles] if quantiles else 0.0
        if do_bench is not None:
            return do_bench(kernel_call, quantiles=quantiles)
        from triton.runtime.driver import driver
        return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)
    return timer


def keep(candidates: list[triton.Config]) -> list[triton.Config]:
    """The candidates an autotuner may time: all of them, or the first under a pin switch."""
    if not candidates:
        raise ValueError("every autotuning config was pruned; the prune rule must keep one")
    return list(candidates[:1]) if single_config() else list(candidates)


@contextmanager
def forced(kernel, config: triton.Config) -> Iterator[None]:
    """Within the block, `kernel` (an autotuned kernel) runs exactly `config`, bypassing its
    pruning and its cache of earlier picks. For tests: the autotuner only ever runs its pick."""
    saved = kernel.configs, kernel.early_config_prune, dict(kernel.cache)
    kernel.configs, kernel.early_config_prune = [config], None
    kernel.cache.clear()
    try:
        yield
    finally:
        kernel.configs, kernel.early_config_prune = saved[0], saved[1]
        kernel.cache.clear()
        kernel.cache.update(saved[2])
