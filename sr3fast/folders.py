"""Planning a `sr3fast upscale` run over files and folders: which images, where each result
goes, the seed of each, which process does which, and which go through the model together.

    jobs = plan(["photos/"], "out/")                  # photos/a/b.jpg -> out/a/b.png, sorted
    mine = shard(jobs, rank, world_size)              # every job in exactly one shard
    todo = [j for j in mine if not j.target.exists()] # --skip-existing
    for batch in same_size_batches(todo, 8): ...

Nothing here imports torch or writes a file; the command (sr3fast.cli) runs the plan.

Reproducibility: an image's seed is `file_seed(seed, job.key)`, a function of --seed and the
image's path relative to the folder that was named (its file name when named directly), never of
its position in the list, in a batch or in a shard. So the output of a file does not depend on
which other files are upscaled with it, on the batch size, or on the number of processes. The one
exception is a run naming a single image file: it gets --seed itself, so that
`sr3fast upscale photo.png -o x.png --seed S` equals `sr3fast.upscale("photo.png", seed=S)`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Sequence

from .images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Job:
    """One input image and what becomes of it."""
    source: Path          # the input file
    key: str              # its path relative to the named folder, '/'-separated (the seed's key)
    target: Path          # the output file
    named: bool = False   # the file was named itself, not found in a named folder


def find_images(paths: Sequence[str | os.PathLike], exclude: Path | None = None) -> list[tuple[Path, str]]:
    """(file, key) for every input: files named directly (key: the file name), and every image
    (IMAGE_SUFFIXES, any case) under named folders, recursively (key: the path below the folder).
    Hidden files and folders (names starting with '.', such as macOS '._x.png' resource forks,
    which are not images) are skipped, symbolic links to folders are not followed, and `exclude`
    (the output folder, when it lies inside an input folder) is not searched, so a second run
    does not take the first run's results as inputs. Order: as named, each folder sorted by key.
    Raises FileNotFoundError for a missing path, ValueError for a folder without images."""
    found: list[tuple[Path, str]] = []
    skip = exclude.resolve() if exclude is not None else None
    for name in paths:
        path = Path(name)
        if path.is_dir():
            inside = []
            for folder, subfolders, files in os.walk(path):
                subfolders[:] = [d for d in subfolders if not d.startswith(".")
                                 and (skip is None or (Path(folder) / d).resolve() != skip)]
                inside.extend(Path(folder) / f for f in files
                              if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise ValueError(f"folder {str(name)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}), "
                                 "in subfolders neither")
            keyed = [(file, file.relative_to(path).as_posix()) for file in inside]
            found.extend(sorted(keyed, key=lambda item: item[1]))
        elif path.is_file():
            found.append((path, path.name))             # named itself: key == its name
        else:
            raise FileNotFoundError(f"input {str(name)!r} does not exist")
    return found


def plan(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> list[Job]:
    """The jobs of `sr3fast upscale PATHS -o OUTPUT`. OUTPUT is the output file when a single
    image file is named and OUTPUT has an image suffix; otherwise a folder receiving
    <key without suffix>.png per input, so a folder's tree is mirrored below it. Checks that every
    output is reachable and distinct (raising ValueError, FileNotFoundError) and creates nothing:
    folders are made when their first image is written."""
    out = Path(output)
    single_file = len(paths) == 1 and Path(paths[0]).is_file()
    if single_file and out.suffix.lower() in IMAGE_SUFFIXES:
        if not out.parent.is_dir():
            raise FileNotFoundError(f"output folder {str(out.parent)!r} does not exist")
        source = Path(paths[0])
        return [Job(source, source.name, out, named=True)]
    found = find_images(paths, exclude=out)
    if out.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"{len(found)} inputs need an output folder, not the file {str(output)!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(output)!r} is a file; name a folder for {len(found)} images")
    if not out.is_dir() and not out.parent.is_dir():
        raise FileNotFoundError(f"cannot create output folder {str(output)!r}: "
                                f"{str(out.parent)!r} does not exist")
    named = {Path(name) for name in paths if Path(name).is_file()}
    jobs = [Job(source, key, out / PurePosixPath(key).with_suffix(".png"), named=source in named)
            for source, key in found]
    owner: dict[Path, Path] = {}
    for job in jobs:
        target = job.target.resolve()
        if target in owner:
            raise ValueError(f"{str(owner[target])!r} and {str(job.source)!r} would both be written to "
                             f"{str(job.target)!r} (same name without suffix, or named twice); upscale "
                             "them into separate folders")
        if target == job.source.resolve():
            raise ValueError(f"the output of {str(job.source)!r} would overwrite it; name another "
                             "output folder")
        owner[target] = job.source
    return jobs


def file_seed(seed: int, key: str) -> int:
    """The seed of the image at relative path `key` in a run with --seed `seed`: the first 63 bits
    of SHA-256("seed/key"). A hash, not seed + position, so that it depends on nothing else in the
    run; 63 bits so that it fits every generator's manual_seed."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def job_seeds(jobs: Sequence[Job], seed: int | None) -> dict[Job, int | None]:
    """Each job's seed: None without --seed; --seed itself for a run of one image file named
    directly (the module docstring says why); else file_seed(seed, job.key). `jobs`: the whole
    run's, before sharding (a shard of one job is not a run of one image)."""
    if seed is None:
        return {job: None for job in jobs}
    if len(jobs) == 1 and jobs[0].named:
        return {jobs[0]: seed}
    return {job: file_seed(seed, job.key) for job in jobs}


def shard(jobs: Sequence[Job], rank: int, world_size: int) -> list[Job]:
    """The jobs of process `rank` out of `world_size`: every world_size-th job from `rank` on. The
    shards partition `jobs` (each job in exactly one), and are balanced to within one job.
    Sharding comes before --skip-existing on purpose: every process lists the same inputs, while
    the outputs change as processes write them, so a split made after skipping could give a file
    to two processes, or to none."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(jobs[rank::world_size])


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels. Raises ValueError
    when the file is not a readable image."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(path)!r} as an image ({err}); supported: "
                         f"{', '.join(IMAGE_SUFFIXES)}") from None


def same_size_batches(jobs: Iterable[Job], batch_size: int, sizes: dict[Job, tuple[int, int]]
                      ) -> Iterator[list[Job]]:
    """Groups of at most `batch_size` jobs whose inputs have the same size (`sizes[job]`), in
    the order their first member comes in `jobs`: a group is given out when it is full, the
    partial ones at the end. Images of one size give outputs of one size, so a group can go
    through the model as one (B, 3, h, w) batch."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    open_groups: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        group = open_groups.setdefault(sizes[job], [])
        group.append(job)
        if len(group) == batch_size:
            yield open_groups.pop(sizes[job])
    yield from open_groups.values()
