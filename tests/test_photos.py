"""The default model's data: scripts/collect_photos.py and DATA.md agree, the held-out split is
fixed and disjoint from the training photos, and every photo has a licence."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def collect_photos():
    spec = importlib.util.spec_from_file_location("collect_photos", ROOT / "scripts" / "collect_photos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def collected(collect_photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("photos")
    assert collect_photos.main(["--out", str(out)]) == 0
    return out, json.loads((out / "manifest.json").read_text())


def test_the_held_out_photos_are_the_fixed_three(collected):
    _, manifest = collected
    assert sorted(e["name"] for e in manifest if e["split"] == "val") == ["coffee", "flower", "grace_hopper"]


def test_held_out_and_training_photos_are_disjoint_and_on_disk(collected):
    out, manifest = collected
    train = {e["sha256"] for e in manifest if e["split"] == "train"}
    val = {e["sha256"] for e in manifest if e["split"] == "val"}
    assert len(train) == sum(e["split"] == "train" for e in manifest) and not train & val
    import hashlib
    for entry in manifest:
        pixels = np.asarray(Image.open(out / entry["split"] / f"{entry['name']}.png"))
        assert pixels.shape == (entry["height"], entry["width"], 3)
        assert hashlib.sha256(pixels.tobytes()).hexdigest() == entry["sha256"]
    assert not list(out.rglob("*.tmp")), "no temporary files are left behind"


def test_every_photo_has_a_licence_and_is_listed_in_data_md(collect_photos):
    table = (ROOT / "DATA.md").read_text()
    for photo in collect_photos.CATALOGUE:
        assert photo.licence and photo.credit
        row = next((line for line in table.splitlines() if line.startswith(f"| {photo.name}")
                    or line.startswith(f"| **{photo.name}**")), None)
        assert row is not None, f"{photo.name} is missing from DATA.md"
        assert photo.split in row and photo.licence in row and photo.package in row
