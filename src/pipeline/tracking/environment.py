"""What a run records about where it ran: host, CPU, GPU, package versions, the git commit, and
the process (so that a later run can tell a dead run from a live one)."""

from __future__ import annotations

import contextlib
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
        "torchvision_version": _version("torchvision"),
        "nni_version": _version("nni"),
        "python_version": platform.python_version(),
    }
    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name(0)
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    return tags


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


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
