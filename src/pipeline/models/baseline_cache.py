"""Content-addressed cache of trained baselines; files are written atomically, so that
concurrent sweep jobs never read a half-written one."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.config.identity import TRAINER_NOT_IDENTITY, identity_settings, settings_hash
from pipeline.config.schema import RunSettings
from pipeline.files import atomic_path


def baseline_cache_path(settings: RunSettings) -> Path | None:
    """Where a baseline trained from these settings is cached: a hash of everything that
    decides its weights (model, data, the training settings, the loss, the batch cap, the seed)."""
    if not settings.baseline.cache or settings.baseline.checkpoint:
        return None
    training = {
        key: value
        for key, value in identity_settings(settings)["baseline"].items()
        # The memory layout changes float rounding, not the recipe (as the device does not).
        if key not in ("checkpoint", "cache", "convergence", "channels_last")
    }
    parts = [
        settings.model,
        settings.dataset,
        training,
        settings.criterion,
        settings.max_batches,
        settings.seed,
    ]
    # Processes and precision change the weights; left at their defaults, the key is as it was.
    trainer = {
        key: value
        for key, value in identity_settings(settings).get("trainer", {}).items()
        if key not in TRAINER_NOT_IDENTITY
    }
    if trainer:
        parts.append(trainer)
    key = settings_hash(parts)
    return Path(settings.paths.cache_dir) / "baselines" / f"{key}.safetensors"


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(path, size_hint=size) as staging:
        save_file(tensors, staging, metadata=metadata)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata strings saved with them."""
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(path), metadata
