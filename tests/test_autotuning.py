"""kernels/autotuning.py: the pin switches (SR3FAST_TRITON_AUTOTUNE=pinned, TRITON_INTERPRET=1)
cut the candidates left by a kernel's own pruning to the first one, and only when set; an empty
candidate list is an error; `forced` runs exactly the given config and puts the kernel back.

A toy kernel stores its TAG constexpr, so a launch shows which config ran. Without a GPU it
runs under Triton's interpreter (tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch

from sr3fast import backends
from support import DEVICE

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from sr3fast.kernels import autotuning  # noqa: E402

TRITON_UNAVAILABLE = backends.unavailable_reason("triton", DEVICE.type)
needs_triton = pytest.mark.skipif(TRITON_UNAVAILABLE is not None, reason=str(TRITON_UNAVAILABLE))

CONFIGS = [triton.Config({"TAG": tag}, num_warps=4) for tag in (1, 2, 3)]


def _tags_at_least(configs, named_args, **kwargs):
    """The toy kernel's own prune rule: configs whose TAG is at least the launch's min_tag."""
    return [cfg for cfg in configs if cfg.kwargs["TAG"] >= named_args["min_tag"]]


@autotuning.autotune(CONFIGS, key=["min_tag"], prune=_tags_at_least)
@triton.jit
def _tag_kernel(out_ptr, min_tag, TAG: tl.constexpr):
    tl.store(out_ptr + tl.program_id(0), TAG)


def _launch(min_tag: int) -> int:
    """The TAG of the config that ran."""
    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _tag_kernel[(1,)](out, min_tag)
    return int(out.item())


def _tags(configs) -> list[int]:
    return [cfg.kwargs["TAG"] for cfg in configs]


@pytest.fixture
def unpinned(monkeypatch):
    """Neither switch set: what a GPU run without SR3FAST_TRITON_AUTOTUNE sees."""
    monkeypatch.delenv(autotuning.PIN_VARIABLE, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


@pytest.fixture
def fresh_cache():
    """The toy kernel's autotuning cache, emptied around the test (picks are cached per key)."""
    _tag_kernel.cache.clear()
    yield
    _tag_kernel.cache.clear()


# ------------------------------------------------------------------------- the switches

def test_keep_passes_everything_unless_a_switch_is_set(unpinned):
    assert not autotuning.single_config()
    assert _tags(autotuning.keep(CONFIGS)) == [1, 2, 3]
    unpinned.setenv(autotuning.PIN_VARIABLE, "timed")  # any other value leaves tuning on
    assert _tags(autotuning.keep(CONFIGS)) == [1, 2, 3]


@pytest.mark.parametrize("variable, value", [(autotuning.PIN_VARIABLE, "pinned"),
                                             (autotuning.PIN_VARIABLE, " Pinned "),
                                             ("TRITON_INTERPRET", "1")])
def test_either_switch_keeps_the_first_candidate(unpinned, variable, value):
    unpinned.setenv(variable, value)
    assert autotuning.single_config()
    assert _tags(autotuning.keep(CONFIGS)) == [1]
    assert _tags(autotuning.keep(CONFIGS[1:])) == [2]


def test_switch_applies_after_the_kernels_own_pruning(unpinned):
    """The first *surviving* config is kept, not the first declared one; the switch is read at
    each launch (here: each pruning), not when the kernel is declared."""
    prune = _tag_kernel.early_config_prune
    assert _tags(prune(CONFIGS, {"min_tag": 2})) == [2, 3]
    unpinned.setenv(autotuning.PIN_VARIABLE, "pinned")
    assert _tags(prune(CONFIGS, {"min_tag": 2})) == [2]
    unpinned.delenv(autotuning.PIN_VARIABLE)
    assert _tags(prune(CONFIGS, {"min_tag": 1})) == [1, 2, 3]


def test_keep_refuses_an_empty_list(unpinned):
    with pytest.raises(ValueError, match="every autotuning config was pruned"):
        autotuning.keep([])
    unpinned.setenv(autotuning.PIN_VARIABLE, "pinned")  # not hidden by the cut to one either
    with pytest.raises(ValueError, match="every autotuning config was pruned"):
        _tag_kernel.early_config_prune(CONFIGS, {"min_tag": 4})


def test_pinned_timer_runs_nothing(unpinned):
    """Triton 3.6 (the GPU's) times the candidates even when pruning left one; pinned, the timer
    must report without running the kernel (the interpreter has no timer at all)."""
    calls = []
    unpinned.setenv(autotuning.PIN_VARIABLE, "pinned")
    assert _tag_kernel.do_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0, 0, 0]
    assert calls == []


def test_unpinned_timer_is_the_one_given(unpinned):
    """Unpinned, a benchmarker passed to autotune() still does the timing."""
    timed = []

    def bench(kernel_call, quantiles):
        kernel_call()
        return [7.0] * len(quantiles)

    kernel = autotuning.autotune(CONFIGS, key=["min_tag"], do_bench=bench)(_tag_kernel.fn)
    assert kernel.do_bench(lambda: timed.append(1), quantiles=(0.5, 0.2, 0.8)) == [7.0] * 3
    assert timed == [1]


# ------------------------------------------------------------------------- launches

@needs_triton
def test_pinned_launch_runs_the_first_surviving_config(monkeypatch, fresh_cache):
    monkeypatch.setenv(autotuning.PIN_VARIABLE, "pinned")  # deterministic on a GPU too
    assert _launch(min_tag=2) == 2
    assert _launch(min_tag=3) == 3
    assert _launch(min_tag=1) == 1


@needs_triton
def test_launch_with_everything_pruned_fails(monkeypatch, fresh_cache):
    monkeypatch.setenv(autotuning.PIN_VARIABLE, "pinned")
    with pytest.raises(ValueError, match="every autotuning config was pruned"):
        _launch(min_tag=4)


@needs_triton
def test_forced_runs_the_given_config_and_restores_the_kernel(monkeypatch, fresh_cache):
    monkeypatch.setenv(autotuning.PIN_VARIABLE, "pinned")
    configs, prune = _tag_kernel.configs, _tag_kernel.early_config_prune
    assert _launch(min_tag=2) == 2  # caches a pick for key (2,)
    cache = dict(_tag_kernel.cache)
    assert cache

    with autotuning.forced(_tag_kernel, CONFIGS[0]):
        assert _launch(min_tag=3) == 1  # its own prune rule would exclude TAG 1
        assert _launch(min_tag=2) == 1  # the cached pick for (2,) is bypassed
    with autotuning.forced(_tag_kernel, triton.Config({"TAG": 9})):  # need not be declared
        assert _launch(min_tag=1) == 9

    assert _tag_kernel.configs is configs and _tag_kernel.early_config_prune is prune
    assert _tag_kernel.cache == cache
    assert _launch(min_tag=3) == 3 and _launch(min_tag=2) == 2


@needs_triton
def test_forced_restores_the_kernel_after_an_error(monkeypatch, fresh_cache):
    monkeypatch.setenv(autotuning.PIN_VARIABLE, "pinned")
    configs, prune = _tag_kernel.configs, _tag_kernel.early_config_prune
    with pytest.raises(RuntimeError, match="inside"):
        with autotuning.forced(_tag_kernel, CONFIGS[2]):
            assert _launch(min_tag=1) == 3
            raise RuntimeError("inside")
    assert _tag_kernel.configs is configs and _tag_kernel.early_config_prune is prune
    assert _tag_kernel.cache == {}
    assert _launch(min_tag=1) == 1
