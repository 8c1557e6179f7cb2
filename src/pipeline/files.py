"""All-or-nothing writes: a crash, Ctrl-C or a concurrent sweep job never sees half a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import filelock


@contextlib.contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file, or with `directory` a folder); when
    the block ends without error it replaces `path` in one rename, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        staging = Path(name)
    try:
        yield staging
        if directory and path.exists():
            shutil.rmtree(path)  # a folder cannot be renamed over a non-empty one
        os.replace(staging, path)
    except BaseException:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        raise


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
