"""`sr3fast study make`: the manifest (every image's SHA-256, both variants, the settings), images
that are what `sr3fast eval` would make, and nothing left on disk when anything fails."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sr3fast
from sr3fast.cli import main as cli
from sr3fast.evaluation import degrade, super_resolve
from sr3fast.study import make as study_make
from sr3fast.study.make import StudyModel, make_study
from sr3fast.study.manifest import VARIANTS, load_manifest
from study_support import write_photos


def pixels(path: Path) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255


def leftovers(folder: Path) -> list[str]:
    """Names in `folder` other than the photos: a study, or a half-built one."""
    return sorted(p.name for p in folder.iterdir() if p.name != "photos")


@pytest.fixture(scope="module")
def default_study(tmp_path_factory):
    """The built-in model, 2 steps, 32 px crops (8 px inputs) of 2 photos; 1 attention check."""
    root = tmp_path_factory.mktemp("default")
    data = write_photos(root / "photos", count=2, size=(48, 52))
    study = root / "study"
    status = cli(["study", "make", "--model", "default", "--data", str(data), "--out", str(study),
                  "--steps", "2", "--crop", "32", "--attention-checks", "1", "--seed", "5", "-q"])
    assert status == 0
    return study


def test_manifest_hashes_every_image(default_study):
    manifest = json.loads((default_study / "manifest.json").read_text())
    on_disk = {f"images/{p.name}" for p in (default_study / "images").iterdir()}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((default_study / name).read_bytes()).hexdigest() == digest
        assert Path(name).stem == digest[:20]             # named by content: the URL says nothing
    assert load_manifest(default_study) == manifest        # and the checked loader agrees
    assert sorted(p.name for p in default_study.iterdir()) == ["images", "manifest.json"]


def test_manifest_trials_both_variants_and_settings(default_study):
    manifest = load_manifest(default_study)
    assert manifest["variants"] == VARIANTS
    cells = Counter((t["kind"], t["model"], t["variant"]) for t in manifest["trials"])
    assert cells == {("model", "default", "with_input"): 2, ("model", "default", "without_input"): 2,
                     ("attention", None, "with_input"): 1, ("attention", None, "without_input"): 1}
    assert len({t["id"] for t in manifest["trials"]}) == 6
    (model,) = manifest["models"]
    assert (model["name"], model["steps"], model["scale"], model["seed"]) == ("default", 2, 4, 5)
    recommended = sr3fast.load("default").inference_settings
    assert (model["sampler"], model["start_gamma"], model["back_projections"]) == \
        (recommended.sampler, recommended.start_gamma, recommended.back_projections)
    assert manifest["settings"]["crop"] == 32 and manifest["settings"]["n"] == 2
    assert [item["size"] for item in manifest["items"]] == [[32, 32], [32, 32]]


def test_images_are_what_eval_makes(default_study):
    """Input: the truth degraded as `sr3fast eval` does; output: the model at the recorded
    settings and seed, bit for bit; attention picture: far blurrier than the output."""
    manifest = load_manifest(default_study)
    item = manifest["items"][0]
    truth = pixels(default_study / item["ground_truth"])
    low = pixels(default_study / item["input"])
    assert tuple(truth.shape[-2:]) == (32, 32) and tuple(low.shape[-2:]) == (8, 8)
    assert torch.equal(low, degrade(truth, 4))
    output = pixels(default_study / item["outputs"]["default"])
    assert torch.equal(output, super_resolve(sr3fast.load("default"), low, 5, steps=2))
    blurred = pixels(default_study / item["attention"])
    assert blurred.shape == truth.shape
    detail = lambda image: (image[..., 1:, :] - image[..., :-1, :]).abs().mean()   # noqa: E731
    assert detail(blurred) < 0.5 * detail(truth)


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, capsys):
    data = write_photos(tmp_path / "photos", count=2)
    out = str(tmp_path / "study")
    base = ["study", "make", "--model", "tiny", "--out", out, "--steps", "2", "-q"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    cases = [
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--data", str(tmp_path / "empty")], "holds no images"),
        (["--data", str(tmp_path / "photos")], "unreadable"),
        (["--data", str(data / "photo0.png"), "--crop", "18"], "--crop must be a multiple"),
        (["--data", str(data / "photo0.png"), "--attention-checks", "2"], "--attention-checks"),
        (["--data", str(data / "photo0.png"), "--n", "3"], "--n must be between"),
        (["--data", str(data / "photo0.png"), "--model", "nonsense-model"], "cannot load model"),
        (["--data", str(data / "photo0.png"), "--sampler", "magic"], "sampler"),
        (["--data", str(data / "photo0.png"), "--scale", "8"], "not a power"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert cli(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert leftovers(tmp_path) == ["empty"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    status = cli(["study", "make", "--model", "tiny", "--data", str(data / "photo0.png"), "--out",
                  str(tmp_path / "taken"), "-q"])
    assert status == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


@pytest.mark.parametrize("failure", [RuntimeError("sampling failed"), KeyboardInterrupt()])
def test_failure_while_sampling_leaves_nothing(tmp_path, monkeypatch, failure):
    """A failure after images have been written (the second sample) removes the partial folder."""
    data = write_photos(tmp_path / "photos", count=2)
    calls = []

    def fail_second(model, low, seed, **options):
        calls.append(1)
        if len(calls) == 2:
            raise failure
        return super_resolve(model, low, seed, **options)

    monkeypatch.setattr("sr3fast.evaluation.super_resolve", fail_second)
    models = [StudyModel("tiny", sr3fast.load("tiny", seed=0))]
    with pytest.raises(type(failure)):
        make_study(models, [data], tmp_path / "study", steps=1, crop=16, progress=False)
    assert len(calls) == 2
    assert leftovers(tmp_path) == []


def test_several_models_named_once_and_same_scale(tmp_path):
    data = write_photos(tmp_path / "photos", count=1)
    tiny = sr3fast.load("tiny", seed=0)
    with pytest.raises(ValueError, match="named twice"):
        make_study([StudyModel("a", tiny), StudyModel("a", tiny)], [data], tmp_path / "s", progress=False)
    assert study_make.choose_photos([Path("a"), Path("b"), Path("c")], 2, 0) == \
        study_make.choose_photos([Path("a"), Path("b"), Path("c")], 2, 0)
    assert leftovers(tmp_path) == []
