"""All-or-nothing writes: a crash, Ctrl-C or a concurrent sweep job never sees half a file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import filelock

from pipeline.errors import DiskFullError


@contextlib.contextmanager
def atomic_path(
    path: str | Path, directory: bool = False, size_hint: int | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file, or with `directory` a folder); when
    the block ends without error it replaces `path` in one rename, else it is removed, and
    `path` keeps what it held before. A full disk becomes DiskFullError, whose line names the
    path, the space free and the space the write needed (`size_hint` bytes, where the caller
    knows it)."""
    path = Path(path)
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        else:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            staging = Path(name)
        yield staging
        if directory and path.exists():
            shutil.rmtree(path)  # a folder cannot be renamed over a non-empty one
        os.replace(staging, path)
    except BaseException as error:
        full = is_disk_full(error) and not isinstance(error, DiskFullError)
        written = _size(staging) if full else 0  # measured before the staging is removed
        if staging is not None and staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging is not None:
            staging.unlink(missing_ok=True)
        if full:
            raise DiskFullError(_disk_full_line(path, written, size_hint)) from None
        raise


def is_disk_full(error: BaseException) -> bool:
    """No space left (or over quota), as an OSError or as the message of a library that wraps
    it (safetensors' SafetensorError says "No space left on device (os error 28)")."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def _size(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _disk_full_line(path: Path, written: int, size_hint: int | None) -> str:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    if size_hint:
        needed = f"about {_mib(size_hint)} needed"
    else:
        needed = f"more than the {_mib(written)} written before it filled"
    return (
        f"no space left on the device of {path}: {_mib(free)} free, {needed}; nothing was "
        f"left half-written (free some space, or set paths.output_root to another disk)"
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def write_json(record: dict, path: str | Path) -> Path:
    with atomic_path(path) as staging:
        staging.write_text(json.dumps(record, indent=2, default=str))
    return Path(path)


def file_lock(path: str | Path) -> filelock.FileLock:
    """An exclusive lock on `<path>.lock` for a `with` block, so that concurrent jobs and
    pipelines on the same output root make a file once: the first makes it, the others wait and
    then find it. On Unix it is an flock, which goes with the process, even on SIGKILL."""
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(lock_path)
