"""Stage 1: the unpruned model, from a checkpoint, from the cache, or trained here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from pipeline.cache import load_weights, save_weights
from pipeline.data import StageInputs
from pipeline.models import load_state_dict
from pipeline.schema import BaselineSettings
from pipeline.training import fit


@dataclass
class BaselineResult:
    model: nn.Module
    source: str  # "checkpoint", "cache" or "trained"
    weights_path: Path | None
    history: list[dict] = field(default_factory=list)


def baseline(
    model: nn.Module,
    inputs: StageInputs,
    settings: BaselineSettings,
    cache_path: Path | None,
) -> BaselineResult:
    """Fill `model` with baseline weights: the checkpoint if given, else cached, else trained."""
    device = inputs.device
    if settings.checkpoint:
        model.load_state_dict(load_state_dict(settings.checkpoint, key="baseline.checkpoint"))
        return BaselineResult(model.to(device), "checkpoint", Path(settings.checkpoint))
    if cache_path is not None and cache_path.is_file():
        model.load_state_dict(load_weights(cache_path))
        return BaselineResult(model.to(device), "cache", cache_path)

    result = fit(model, inputs.loaders, inputs.criterion, settings, device, desc="baseline")
    if cache_path is not None:
        save_weights(
            model.state_dict(), cache_path, metadata={"best_epoch": str(result.best_epoch)}
        )
    return BaselineResult(model, "trained", cache_path, result.history)
