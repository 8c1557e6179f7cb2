"""Content-addressed cache of trained baselines; files are written atomically, so that
concurrent sweep jobs never read a half-written one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.files import atomic_path


def cache_key(*parts: object) -> str:
    """A stable hash of JSON-serialisable settings: equal settings, equal key."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    with atomic_path(path) as staging:
        save_file(tensors, staging, metadata=metadata)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata strings saved with them."""
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(path), metadata
