"""Cascades (sr3fast.cascade, upscale(scale=)): shapes, per-stage settings, seeds per stage."""
from __future__ import annotations

import pytest
import torch

import sr3fast
from sr3fast.cascades import Cascade


@pytest.fixture(scope="module")
def tiny():
    return sr3fast.load("tiny", seed=0)


@pytest.fixture
def calls(monkeypatch):
    """Each sampling call's (sampler, steps, condition shape), recorded on the way through."""
    import sr3fast.diffusion as diffusion
    real, seen = diffusion.sample, []

    def recording(name, model, x, schedule, **kwargs):
        seen.append((name, len(schedule.gammas), tuple(x.shape)))
        return real(name, model, x, schedule, **kwargs)

    monkeypatch.setattr(diffusion, "sample", recording)
    return seen


def test_two_stages_multiply_the_size_each_with_its_settings(tiny, calls):
    pipeline = sr3fast.cascade([tiny, tiny], steps=[3, 2], sampler=["posterior", "ddim"])
    assert isinstance(pipeline, Cascade) and pipeline.factor == 16
    out = sr3fast.upscale(torch.rand(2, 3, 3, 5), model=pipeline, seed=0, progress=False)
    assert out.shape == (2, 3, 48, 80)
    assert calls == [("posterior", 3, (2, 3, 12, 20)), ("ddim", 2, (2, 3, 48, 80))]


def test_scale_chains_the_model_with_itself(tiny, calls):
    out = sr3fast.upscale(torch.rand(1, 3, 2, 3), model=tiny, scale=16, steps=2, sampler="sr3",
                          seed=0, progress=False)
    assert out.shape == (1, 3, 32, 48)
    assert calls == [("sr3", 2, (1, 3, 8, 12)), ("sr3", 2, (1, 3, 32, 48))]


def test_scale_with_the_default_model(calls):
    out = sr3fast.upscale(torch.rand(1, 3, 4, 3), scale=16, steps=1, seed=0, progress=False)
    assert out.shape == (1, 3, 64, 48) and len(calls) == 2


def test_a_cascade_is_its_stages_run_by_hand_with_the_stage_seeds(tiny):
    """The stages are ordinary upscale calls, each with its own seed drawn from the call's, the
    image between them kept in float [0, 1]: running them by hand gives the same bits."""
    x = torch.rand(1, 3, 3, 4, generator=torch.Generator().manual_seed(1))
    pipeline = sr3fast.cascade([tiny, tiny], steps=[2, 3], sampler="posterior")
    out = sr3fast.upscale(x, model=pipeline, seed=7, progress=False)
    first, second = pipeline.stage_seeds(7)
    assert first != second
    by_hand = sr3fast.upscale(x, model=tiny, steps=2, sampler="posterior", seed=first, progress=False)
    by_hand = sr3fast.upscale(by_hand.clamp(0, 1), model=tiny, steps=3, sampler="posterior", seed=second,
                              progress=False)
    assert torch.equal(out, by_hand)
    assert torch.equal(out, sr3fast.upscale(x, model=pipeline, seed=7, progress=False))
    assert not torch.equal(out, sr3fast.upscale(x, model=pipeline, seed=8, progress=False))


def test_the_calls_settings_fill_what_a_stage_leaves_open(tiny, calls):
    pipeline = sr3fast.cascade([tiny, tiny], steps=[None, 2])
    sr3fast.upscale(torch.rand(1, 3, 2, 2), model=pipeline, steps=4, sampler="ddim", seed=0, progress=False)
    assert calls == [("ddim", 4, (1, 3, 8, 8)), ("ddim", 2, (1, 3, 32, 32))]


def test_uint8_in_uint8_out_and_tiles_per_stage(tiny):
    x = (torch.rand(1, 3, 3, 5) * 255).to(torch.uint8)
    out = sr3fast.upscale(x, model=sr3fast.cascade([tiny, tiny], steps=1), seed=0, progress=False, tile=16)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 48, 80)


def test_mistakes_are_explained(tiny):
    with pytest.raises(ValueError, match="not a power"):
        sr3fast.upscale(torch.rand(1, 3, 2, 2), model=tiny, scale=8)
    with pytest.raises(ValueError, match="this cascade upscales 16x"):
        sr3fast.upscale(torch.rand(1, 3, 2, 2), model=sr3fast.cascade([tiny, tiny]), scale=4)
    with pytest.raises(ValueError, match="one per stage"):
        sr3fast.cascade([tiny, tiny], steps=[1, 2, 3])
    with pytest.raises(TypeError, match="list of models"):
        sr3fast.cascade("tiny")
