"""The manifest of a study folder: `manifest.json`, written last by `sr3fast study make`.

It names every image of the study and its SHA-256, the models and the settings that made them,
and the trials. Images are stored under names made from their hash (``images/<hash>.png``), so
that the address of an image shown in the browser does not say whether it is a model's output or
a photo. Everything that reads a study goes through `load_manifest`, which checks its structure
and, by default, every image's hash.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path

MANIFEST = "manifest.json"
ANSWERS = "answers.sqlite"
FORMAT = "sr3fast-study"
VERSION = 1

# The paper's two tasks (§4.2.2) and the question each asks.
VARIANTS = {
    "with_input": "Which of the two images is a better high quality version of the low resolution "
                  "image in the middle?",
    "without_input": "Which image would you guess is from a camera?",
}
KINDS = ("model", "attention")   # attention: the candidate is a heavily blurred image, not a model's


class StudyError(ValueError):
    """A study folder that is missing, incomplete or changed since it was made."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def study_id(files: dict[str, str], trials: list[dict]) -> str:
    """An identifier made from the study's content: the same images and trials give the same id.
    Participant seeds are derived from it, and the answers database is tied to it."""
    text = json.dumps({"files": files, "trials": trials}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def safe_relative(name: object) -> bool:
    """Whether `name` is a plain relative path inside the study folder (no '..', not absolute,
    no backslashes or empty parts): the only kind a manifest may list."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    if name.startswith("/") or posixpath.normpath(name) != name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def load_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The manifest of study `folder`, checked: its format, that every trial refers to a known
    item, model and variant, that every listed file exists inside the folder, and (verify=True)
    that each file's SHA-256 is the one recorded. Raises StudyError saying what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise StudyError(f"study folder {str(folder)!r} does not exist; make one with `sr3fast study make`")
    if not path.is_file():
        raise StudyError(f"{str(folder)!r} is not a study folder: it has no {MANIFEST} (make one with "
                         "`sr3fast study make`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StudyError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StudyError(f"{str(path)!r} is not the manifest of an sr3fast study")
    if manifest.get("version") != VERSION:
        raise StudyError(f"{str(path)!r} has study format version {manifest.get('version')!r}; this "
                         f"sr3fast reads version {VERSION}")
    _check_structure(manifest, path)
    if verify:
        changed = [name for name, digest in manifest["files"].items()
                   if sha256_file(folder / name) != digest]
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise StudyError(f"{len(changed)} image(s) of study {str(folder)!r} differ from their "
                             f"SHA-256 in {MANIFEST}: {shown}. The folder was changed after `sr3fast "
                             "study make`; make the study again")
    return manifest


def _check_structure(manifest: dict, path: Path) -> None:
    try:
        files, items, models, trials = (manifest["files"], manifest["items"], manifest["models"],
                                        manifest["trials"])
        names = {model["name"] for model in models}
        by_id = {item["id"]: item for item in items}
        problems = [name for name in files if not safe_relative(name)]
        problems += [name for name in files if safe_relative(name)
                     and not (path.parent / name).is_file()]
        for item in items:
            pictures = [item["input"], item["ground_truth"], item["attention"], *item["outputs"].values()]
            problems += [p for p in pictures if p not in files]
            if set(item["outputs"]) != names:
                problems.append(f"item {item['id']}'s outputs")
        for trial in trials:
            if (trial["item"] not in by_id or trial["variant"] not in VARIANTS or trial["kind"] not in KINDS
                    or (trial["kind"] == "model") != (trial["model"] in names)):
                problems.append(f"trial {trial.get('id')!r}")
        if len({trial["id"] for trial in trials}) != len(trials):
            problems.append("duplicate trial ids")
    except (KeyError, TypeError, AttributeError) as err:
        raise StudyError(f"{str(path)!r} is incomplete ({type(err).__name__}: {err}); make the study "
                         "again") from None
    if problems:
        raise StudyError(f"{str(path)!r} refers to missing or unsafe entries: {', '.join(map(str, problems[:5]))}"
                         "; make the study again")


def trial_pictures(manifest: dict, trial: dict) -> tuple[str, str, str]:
    """(candidate, ground truth, low-resolution input): the manifest paths a trial shows. The
    candidate is the model's output, or for an attention check the blurred image."""
    item = next(item for item in manifest["items"] if item["id"] == trial["item"])
    candidate = item["outputs"][trial["model"]] if trial["kind"] == "model" else item["attention"]
    return candidate, item["ground_truth"], item["input"]
