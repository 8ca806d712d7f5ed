"""Input/output plumbing of the product layer: image conversion, atomic writes, config parsing,
checkpoint file errors."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sr3fast.atomic import atomic_path
from sr3fast.checkpoint import CheckpointError, check_state_dict, read_checkpoint, save_checkpoint
from sr3fast.compat.public_sr3 import read_config, strip_json_comments
from sr3fast.images import from_unit_batch, save_image_atomic, to_unit_batch


# ---------------------------------------------------------------- image conversion

def test_float_tensor_round_trip_keeps_dtype():
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    batch, kind = to_unit_batch(x)
    assert batch.dtype == torch.float32 and batch.shape == x.shape
    back = from_unit_batch(batch, kind)
    assert back.dtype == torch.float64
    torch.testing.assert_close(back, x, atol=1e-7, rtol=0)


def test_uint8_tensor_round_trip_is_exact():
    x = torch.randint(0, 256, (1, 3, 4, 6), dtype=torch.uint8)
    batch, kind = to_unit_batch(x)
    assert torch.equal(from_unit_batch(batch, kind), x)


def test_pil_and_path_inputs_give_pil(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    path = tmp_path / "in.png"
    image.save(path)
    for source in (image, path, str(path)):
        batch, kind = to_unit_batch(source)
        assert batch.shape == (1, 3, 6, 9)
        out = from_unit_batch(batch, kind)
        assert isinstance(out, Image.Image) and np.array_equal(np.asarray(out), array)


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    for mode in ("L", "RGBA"):
        batch, _ = to_unit_batch(Image.new(mode, (4, 3)))
        assert batch.shape == (1, 3, 3, 4)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 8, 8), r"\(B, 3, h, w\).*x\[None\]"),
    (torch.rand(1, 4, 8, 8), r"\(B, 3, h, w\)"),
    (torch.rand(1, 1, 3, 8, 8), r"\(B, 3, h, w\)"),
    (torch.rand(1, 3, 8, 8) * 2 - 1, r"\[0, 1\].*\(x \+ 1\) / 2"),
    (torch.rand(1, 3, 8, 8) * 255, r"\[0, 1\].*x / 255"),
    (torch.full((1, 3, 2, 2), float("nan")), "NaN or Inf"),
    (torch.full((1, 3, 2, 2), float("inf")), "NaN or Inf"),
    (torch.zeros(0, 3, 8, 8), "empty"),
])
def test_bad_tensors_are_refused_with_a_hint(bad, message):
    with pytest.raises(ValueError, match=message):
        to_unit_batch(bad)


def test_integer_tensors_other_than_uint8_and_other_types_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        to_unit_batch(torch.ones(1, 3, 2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="tensor"):
        to_unit_batch([[1, 2]])


def test_missing_and_unreadable_image_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_unit_batch(tmp_path / "nope.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        to_unit_batch(junk)
    with pytest.raises(IsADirectoryError):
        to_unit_batch(tmp_path)


# ---------------------------------------------------------------- atomic writes

def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"], "the temporary file must be cleaned up"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["file.bin"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_checkpoints_get_the_usual_permissions(tmp_path):
    # safetensors' save_file replaces the temporary file with its own, created 0600
    from sr3fast.checkpoint import save_checkpoint

    previous = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, {"unet": {}})
    finally:
        os.umask(previous)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


def test_writing_into_a_missing_folder_fails_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_image_atomic(Image.new("RGB", (2, 2)), tmp_path / "missing" / "out.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "missing" / "m.safetensors", {"w": torch.ones(1)}, {})
    assert os.listdir(tmp_path) == []


def test_image_suffix_is_required(tmp_path):
    with pytest.raises(ValueError, match="image suffix"):
        save_image_atomic(Image.new("RGB", (2, 2)), tmp_path / "out.xyz")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- JSON with comments

def test_comments_are_stripped_outside_strings_only():
    text = '{\n "a": 1, // one\n "url": "http://x//y", /* block\n comment */ "b": "say \\"//\\""\n}'
    assert json.loads(strip_json_comments(text)) == {"a": 1, "url": "http://x//y", "b": 'say "//"'}


def test_read_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_config(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ 'single': quotes }")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config(bad)


# ---------------------------------------------------------------- checkpoint files

def test_checkpoint_round_trip_and_metadata(tmp_path):
    state = {"unet.w": torch.randn(3, 2), "unet.b": torch.arange(4.0)}
    path = save_checkpoint(tmp_path / "m.safetensors", state, {"k": [1, 2]}, {"note": "x"})
    config, tensors, metadata = read_checkpoint(path)
    assert config == {"k": [1, 2]} and metadata["note"] == "x"
    assert all(torch.equal(tensors[k], v) for k, v in state.items())


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", {"unet.w": torch.randn(64, 64)}, {})
    data = path.read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(truncated)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(1)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an sr3fast checkpoint"):
        read_checkpoint(foreign)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.safetensors")


def test_state_dict_check_lists_every_kind_of_mismatch():
    expected = {"a": torch.Size([2]), "b": torch.Size([3, 3]), "c": torch.Size([1])}
    found = {"a": torch.zeros(2), "b": torch.zeros(3, 4), "z": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        check_state_dict(expected, found, "ckpt")
    message = str(info.value)
    assert "1 missing key(s):\n    c" in message
    assert "1 unexpected key(s):\n    z" in message
    assert "b: checkpoint (3, 4), model (3, 3)" in message
    check_state_dict(expected, {"a": torch.zeros(2), "b": torch.zeros(3, 3), "c": torch.zeros(1)}, "ok")
