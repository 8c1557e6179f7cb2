"""Stage 1: the unpruned model, from a checkpoint, from the cache, or trained here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.cache import load_weights, save_weights
from pipeline.data import Loaders
from pipeline.models import load_state_dict
from pipeline.schema import BaselineSchema
from pipeline.training import fit


@dataclass
class BaselineResult:
    model: nn.Module
    source: str  # "checkpoint", "cache" or "trained"
    weights_path: Path | None
    history: list[dict] = field(default_factory=list)


def baseline(
    model: nn.Module,
    loaders: Loaders,
    criterion: Callable,
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    settings: BaselineSchema,
    device: torch.device,
    cache_path: Path | None,
    max_batches: int | None = None,
) -> BaselineResult:
    """Fill `model` with baseline weights: the checkpoint if given, else cached, else trained."""
    if settings.checkpoint:
        model.load_state_dict(load_state_dict(settings.checkpoint, key="baseline.checkpoint"))
        return BaselineResult(model.to(device), "checkpoint", Path(settings.checkpoint))
    if cache_path is not None and cache_path.is_file():
        model.load_state_dict(load_weights(cache_path))
        return BaselineResult(model.to(device), "cache", cache_path)

    model.to(device)
    optimizer = optimizer_factory(model.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(settings.epochs, 1))
    result = fit(
        model,
        loaders.train,
        loaders.val,
        criterion,
        optimizer,
        settings.epochs,
        device,
        max_batches=max_batches,
        scheduler=scheduler,
        desc="baseline",
    )
    if cache_path is not None:
        save_weights(
            model.state_dict(), cache_path, metadata={"best_epoch": str(result.best_epoch)}
        )
    return BaselineResult(model, "trained", cache_path, result.history)
