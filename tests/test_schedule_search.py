"""sr3fast tune-schedule: the search finds known optima, the guard keeps blur out, the lambda
schedule family is what it says, and the chosen schedule reaches the model's metadata and
upscale's defaults."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from skimage.data import astronaut

import sr3fast
from sr3fast.diffusion import NoiseSchedule, log_snr
from sr3fast.diffusion.schedules import lambda_levels
from sr3fast.inference_settings import InferenceSettings, schedule_for_steps
from sr3fast.schedule_search import (Box, StepResult, Trial, TuneReport, choose_steps, grid_search,
                                     parse_steps, schedule_dict, tune_schedule)


# ------------------------------------------------------------------------- the search

def test_grid_search_finds_the_optimum_of_a_toy_objective():
    """A smooth objective with its maximum at (6.3, 1.7), off every grid point: the first grid
    lands within one cell, each refinement halves the box, so three rounds end within
    (span/(points-1))·0.5³ of it per parameter."""
    optimum = (6.3, 1.7)
    calls = []

    def objective(p):
        calls.append(p)
        return Trial(p, -((p["lambda_end"] - optimum[0]) ** 2 + 3 * (p["rho"] - optimum[1]) ** 2))

    box = Box(("lambda_end", "rho"), ((1.0, 10.0), (0.5, 3.0)))
    best, trials = grid_search(objective, box, (5, 5), rounds=3)
    assert abs(best.params["lambda_end"] - optimum[0]) <= 9 / 4 * 0.5 ** 3
    assert abs(best.params["rho"] - optimum[1]) <= 2.5 / 4 * 0.5 ** 3
    assert len(calls) == len(trials) == len({tuple(c.values()) for c in calls})   # no point twice
    assert best.score == max(t.score for t in trials)


def test_grid_search_stops_when_nothing_is_feasible():
    box = Box(("lambda_end", "rho"), ((1.0, 10.0), (0.5, 3.0)))
    best, trials = grid_search(lambda p: Trial(p, -math.inf), box, (3, 2), rounds=2)
    assert best.score == -math.inf and len(trials) == 6


def test_choose_steps_takes_the_fewest_within_the_slack():
    def result(steps, psnr, feasible=True):
        trial = Trial({}, psnr if feasible else -math.inf, {"psnr": psnr})
        return StepResult(steps, trial, [trial])
    results = [result(10, 26.0), result(20, 26.45), result(50, 26.5), result(5, 27.0, feasible=False)]
    assert choose_steps(results, slack=0.1) == 20
    assert choose_steps(results, slack=0.6) == 10
    assert choose_steps([result(5, 1.0, feasible=False)], slack=0.1) is None


def test_parse_steps():
    assert parse_steps("10, 20,50") == [10, 20, 50]
    for bad in ("", "10,x", "0,5", "-3"):
        with pytest.raises(ValueError):
            parse_steps(bad)


# ------------------------------------------------------------------ the lambda schedule

@pytest.mark.parametrize("rho", [1.0, 2.5])
def test_lambda_schedule_levels(rho):
    levels = lambda_levels(7, lambda_start=-1.0, lambda_end=5.0, rho=rho)     # g_1 .. g_T
    lam = log_snr(levels).flip(0)                                            # loop order
    u = torch.linspace(0, 1, 7, dtype=torch.float64)
    torch.testing.assert_close(lam, -1.0 + 6.0 * u ** rho, rtol=0, atol=1e-9)
    schedule = NoiseSchedule.from_config(schedule_dict(7, -1.0, 5.0, rho))
    torch.testing.assert_close(schedule.gammas, levels, rtol=1e-12, atol=0)
    assert schedule.num_steps == 7


def test_lambda_schedule_rejects_bad_parameters():
    with pytest.raises(ValueError, match="lambda_start < lambda_end"):
        lambda_levels(5, 3.0, 1.0)
    with pytest.raises(ValueError, match="rho"):
        lambda_levels(5, 0.0, 1.0, rho=0.0)
    with pytest.raises(ValueError, match="needs lambda_start and lambda_end"):
        NoiseSchedule.from_config({"schedule": "lambda", "n_timestep": 5})


def test_a_tuned_schedule_serves_any_step_count():
    tuned = schedule_dict(20, 0.0, 6.0, 1.5)
    assert schedule_for_steps(tuned, 7) == {**tuned, "n_timestep": 7}
    fixed = {"schedule": "linear", "n_timestep": 20, "linear_start": 1e-4, "linear_end": 0.1}
    assert schedule_for_steps(fixed, 20) == fixed and schedule_for_steps(fixed, 7) is None


# --------------------------------------------------------------- on a model, end to end

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("held-out")
    image = astronaut()
    Image.fromarray(image[100:164, 150:214]).save(folder / "a.png")
    Image.fromarray(image[300:348, 240:300]).save(folder / "b.png")
    return folder


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return sr3fast.load("tiny")


def test_tune_schedule_reports_and_recommends(tiny, photos, monkeypatch):
    report = tune_schedule(tiny, [photos], [2, 3], sampler="dpmpp_2m", crop=32, crops_per_image=1,
                           points=(2, 2), rounds=1, guard=0.5, progress=False)
    assert [r.steps for r in report.results] == [2, 3]
    for r in report.results:
        assert all(set(t.metrics) >= {"psnr", "ssim", "consistency", "sharpness_ratio"} for t in r.trials)
        feasible = [t for t in r.trials if t.score > -math.inf]
        assert all(t.metrics["sharpness_ratio"] >= 0.5 * report.baseline["sharpness_ratio"] for t in feasible)
        if feasible:
            assert r.best.score == max(t.metrics["psnr"] for t in feasible)
    text = report.table()
    assert "steps" in text and "baseline" in text
    json.dumps(report.to_dict(), allow_nan=False)

    settings = report.settings(back_projections=0)
    if settings is None:
        pytest.skip("nothing passed the guard on this random model")
    tiny.inference_settings = settings
    seen = {}
    real_sample = sr3fast.diffusion.sample

    def spy(name, model, x, schedule, **kwargs):
        seen["sampler"], seen["gammas"] = name, schedule.gammas.clone()
        return real_sample(name, model, x, schedule, **kwargs)

    monkeypatch.setattr(sr3fast.diffusion, "sample", spy)
    try:
        sr3fast.upscale(torch.rand(1, 3, 4, 4), model=tiny, seed=0, progress=False)
        chosen = NoiseSchedule.from_config(settings.schedule)
        assert seen["sampler"] == "dpmpp_2m"
        torch.testing.assert_close(seen["gammas"], chosen.gammas)
        sr3fast.upscale(torch.rand(1, 3, 4, 4), model=tiny, steps=5, seed=0, progress=False)
        restepped = NoiseSchedule.from_config({**settings.schedule, "n_timestep": 5})
        torch.testing.assert_close(seen["gammas"], restepped.gammas)   # same family, 5 steps
    finally:
        del tiny.inference_settings


def test_the_ancestral_baseline_is_the_posterior_over_every_level_below_the_start(tiny, photos, monkeypatch):
    """baseline="ancestral": the guard's sharpness comes from the posterior sampler over the
    training schedule truncated at the model's start_gamma, every level of it (the quality
    reference), started from the input noised to its first level; not from the recommended
    settings (here ddim, 2 steps)."""
    seen = []
    real_sample = sr3fast.diffusion.sample

    def spy(name, model, x, schedule, **kwargs):
        seen.append((name, schedule.num_steps, schedule.gammas[-1].item(), kwargs.get("y_T") is not None))
        return real_sample(name, model, x, schedule, **kwargs)

    monkeypatch.setattr(sr3fast.diffusion, "sample", spy)
    tiny.inference_settings = InferenceSettings(sampler="ddim", steps=2, start_gamma=0.9)
    try:
        report = tune_schedule(tiny, [photos], [2], sampler="ddim", crop=32, crops_per_image=1,
                               points=(1, 1), rounds=0, baseline="ancestral", progress=False)
    finally:
        del tiny.inference_settings
    training = NoiseSchedule.from_config(tiny.config.schedule)
    below = int((training.gammas >= 0.9).sum())
    assert 1 < below < training.num_steps
    assert seen[0] == ("posterior", below, training.gammas[below - 1].item(), True)
    assert seen[1] == seen[0]                    # one call per held-out crop (two photos)
    assert all(call[0] == "ddim" and call[1] == 2 for call in seen[2:])
    assert f"({below} steps)" in report.baseline["description"]
    with pytest.raises(ValueError, match="baseline must be one of"):
        tune_schedule(tiny, [photos], [2], baseline="best", progress=False)


def test_tune_schedule_cli(tiny, photos, tmp_path, capsys):
    from sr3fast.cli import main

    model_path = tmp_path / "tiny.safetensors"
    sr3fast.save(tiny, model_path)
    out, report = tmp_path / "tuned.safetensors", tmp_path / "tune.json"
    code = main(["tune-schedule", "--model", str(model_path), "--data", str(photos), "--steps", "2,3",
                 "--crop", "32", "--crops-per-image", "1", "--grid", "2x2", "--rounds", "0",
                 "--guard", "0.01", "--sampler", "dpmpp_2m", "-o", str(out), "--json", str(report),
                 "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "lambda_end" in printed.out
    tuned = sr3fast.load(str(out))
    settings = tuned.inference_settings
    assert settings.sampler == "dpmpp_2m" and settings.schedule["schedule"] == "lambda"
    assert settings.steps == json.loads(report.read_text())["chosen_steps"]
    for name, tensor in tiny.state_dict().items():                       # same weights
        assert torch.equal(tuned.state_dict()[name], tensor)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "positive integers"),
    (["--steps", "5", "--grid", "3"], "--grid"),
    (["--steps", "5", "--data", "/nonexistent/folder"], "does not exist"),
])
def test_tune_schedule_cli_errors(tiny, photos, tmp_path, capsys, args, message):
    from sr3fast.cli import EXIT_USAGE, main

    model_path = tmp_path / "tiny.safetensors"
    sr3fast.save(tiny, model_path)
    base = ["tune-schedule", "--model", str(model_path), "--data", str(photos), "-o",
            str(tmp_path / "out.safetensors")]
    assert main(base + args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------- choosing again from a saved search

def _saved_search() -> dict:
    """A search's --json with known candidates: baseline sharpness 1, guard 0.9.
    5 steps: A (30 dB, sharpness 0.85: fails the guard), B (29 dB, 0.95);
    10 steps: C (29.5 dB, 0.95), D (31 dB, 0.5: fails)."""
    def trial(end, rho, psnr, sharp):
        return Trial({"lambda_end": end, "rho": rho}, -math.inf,
                     {"psnr": psnr, "ssim": 0.7, "consistency": 1e-5, "sharpness_ratio": sharp})

    a, b, c, d = trial(5.0, 1.0, 30, 0.85), trial(6.0, 1.5, 29, 0.95), trial(4.0, 2.0, 29.5, 0.95), \
        trial(3.0, 0.5, 31, 0.5)
    report = TuneReport("dpmpp_2m_sde", 0.0, 0.5, 0.9, {"description": "x", "psnr": 29, "ssim": 0.7,
                                                       "consistency": 1e-5, "sharpness_ratio": 1.0},
                        [StepResult(5, a, [a, b]), StepResult(10, c, [c, d])], None)
    return json.loads(json.dumps(report.to_dict()))


def test_a_saved_search_is_judged_again_under_another_guard_and_slack():
    data = _saved_search()
    same = TuneReport.from_dict(data)                       # the file's guard 0.9, slack 0.1
    assert [r.best.metrics["psnr"] for r in same.results] == [29, 29.5]   # A and D fail the guard
    assert same.chosen_steps == 10
    assert TuneReport.from_dict(data, slack=0.6).chosen_steps == 5         # 29 within 0.6 of 29.5
    looser = TuneReport.from_dict(data, guard=0.8)                          # A passes now, D not
    assert [r.best.metrics["psnr"] for r in looser.results] == [30, 29.5] and looser.chosen_steps == 5
    assert TuneReport.from_dict(data, guard=0.99).chosen_steps is None     # nothing passes

    settings = same.settings(back_projections=2, steps=5)                   # B's schedule, 5 steps
    assert settings.steps == 5 and settings.back_projections == 2 and settings.start_gamma == 0.5
    assert settings.schedule == schedule_dict(5, 0.0, 6.0, 1.5)
    assert same.settings(back_projections=0).schedule == schedule_dict(10, 0.0, 4.0, 2.0)
    with pytest.raises(ValueError, match="7 steps were not searched"):
        same.settings(back_projections=0, steps=7)


def test_tune_schedule_cli_from_json_and_choose(tiny, tmp_path, capsys):
    from sr3fast.cli import EXIT_USAGE, main

    model_path, saved = tmp_path / "tiny.safetensors", tmp_path / "search.json"
    sr3fast.save(tiny, model_path)
    saved.write_text(json.dumps(_saved_search()))
    out = tmp_path / "tuned.safetensors"
    base = ["tune-schedule", "--model", str(model_path), "--from-json", str(saved), "-o", str(out)]
    assert main(base + ["--choose", "5"]) == 0, capsys.readouterr().err
    assert sr3fast.load(str(out)).inference_settings.schedule == schedule_dict(5, 0.0, 6.0, 1.5)
    assert main(base + ["--guard", "0.8"]) == 0                             # A's, 5 steps
    assert sr3fast.load(str(out)).inference_settings.schedule == schedule_dict(5, 0.0, 5.0, 1.0)
    out.unlink()
    for extra, message in ((["--choose", "7"], "7 steps were not searched"),
                           (["--data", str(tmp_path)], "one of them")):
        assert main(base + extra) == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not out.exists()
