"""Training checkpoints: one folder per saved step, committed by an atomic rename.

    OUT/checkpoints/step_00001000/
        model.safetensors    EMA weights + config: `sr3fast.load` on it gives the model to sample with
        online.safetensors   the weights the optimizer updates (also loadable by sr3fast.load)
        trainer.pt           optimizer, LR schedule, step, data position, EMA counters, RNG states

The files are written into a hidden staging folder, each one fsynced (sr3fast.atomic), and the
folder is then renamed to step_N. A process killed while saving leaves only the staging folder,
which is ignored and removed later, so every step_N folder is complete; the previous ones stay
loadable. trainer.pt holds only tensors and plain containers and is read with weights_only=True.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ..atomic import fsync_dir

MODEL_FILE, ONLINE_FILE, STATE_FILE = "model.safetensors", "online.safetensors", "trainer.pt"
FILES = (MODEL_FILE, ONLINE_FILE, STATE_FILE)
_NAME = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^\.(step_\d+\..*\.partial|trash-step_\d+)$")
T = TypeVar("T")


def folder_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def remove_leftovers(root: str | os.PathLike) -> int:
    """Delete staging and trash folders left by killed processes; how many there were."""
    root = Path(root)
    leftovers = [e for e in root.iterdir() if _LEFTOVER.match(e.name)] if root.is_dir() else []
    for entry in leftovers:
        shutil.rmtree(entry, ignore_errors=True)
    return len(leftovers)


def save(root: str | os.PathLike, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Commit checkpoint `step` under `root`: write(staging_folder) writes the files, then the
    folder becomes root/step_N in one rename. Keeps the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / folder_name(step)
    if final.exists():  # only when the run resumed from an older one because this one was damaged
        _discard(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=root))
    try:
        write(staging)
        missing = [name for name in FILES if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint writer left out {missing}")
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(root)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints."""
    for _, folder in list_checkpoints(root)[:-keep]:
        _discard(folder)


def _discard(folder: Path) -> None:
    # Renamed out of the step_N namespace first (atomic), so a kill during the deletion never
    # leaves a half-deleted step_N behind.
    trash = folder.parent / f".trash-{folder.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_state(folder: Path, map_location=None) -> dict:
    """The training state dict of checkpoint `folder` (weights_only: no code is executed)."""
    return torch.load(folder / STATE_FILE, map_location=map_location, weights_only=True)


def newest_loadable(root: str | os.PathLike, read: Callable[[Path], T]) -> tuple[Path, T] | None:
    """(folder, read(folder)) of the newest committed checkpoint that `read` can read (it raises
    otherwise), or None. A damaged one (a disk error, a file edited by hand) is reported and
    the previous one tried."""
    for _, folder in reversed(list_checkpoints(root)):
        try:
            return folder, read(folder)
        except Exception as err:  # noqa: BLE001 - any failure means: try the previous one
            warnings.warn(f"checkpoint {str(folder)!r} cannot be read ({err}); trying the previous one")
    return None
