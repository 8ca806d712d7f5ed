"""Writing files so that a crash or kill never leaves a half-written one behind."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder as `path`; when the block succeeds, flush the
    file to disk and rename it over `path` (atomic on POSIX), then sync the folder entry. When the
    block fails, the temporary file is removed and `path` is untouched."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); give it the mode a plainly created file would get
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # again: a writer that replaces the file (safetensors' save_file does) brings its own mode
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform or file system allows it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
