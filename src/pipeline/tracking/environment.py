"""What a run records about where it ran: host, CPU, GPU, package versions, the git commit, and
the process (so that a later run can tell a dead run from a live one)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

import torch


def environment_tags() -> dict[str, str]:
    tags = {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "torch_version": torch.__version__,
        # From the package metadata: importing torchvision costs ~2 s of a rejected run's exit.
        "torchvision_version": package_version("torchvision"),
        "nni_version": package_version("nni"),
        "python_version": platform.python_version(),
    }
    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name(0)
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    return tags


def package_version(package: str) -> str:
    """An installed distribution's version, or "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def source_hash() -> str:
    """A hash of the pipeline's own code and configs (every .py and .yaml file of the package
    and of pipeline.conf, with their paths): results computed by other code have another one,
    committed or not."""
    from importlib.resources import files

    digest = hashlib.sha256()
    for package in ("pipeline", "pipeline.conf"):
        root = Path(str(files(package)))
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def process_tags() -> dict[str, str]:
    """Who runs this run: host, pid and the process's start time (a pid alone can be reused)."""
    import psutil

    return {
        "process.host": socket.gethostname(),
        "process.pid": str(os.getpid()),
        "process.started": f"{psutil.Process().create_time():.2f}",
    }


def alive(tags: Mapping[str, str]) -> bool:
    import psutil

    try:
        process = psutil.Process(int(tags["process.pid"]))
        return f"{process.create_time():.2f}" == tags.get("process.started")
    except (psutil.Error, KeyError, ValueError):
        return False
