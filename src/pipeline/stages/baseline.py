"""Stage 1: the unpruned model, from a checkpoint, from the cache, or trained here."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from pipeline.cache import load_weights, save_weights
from pipeline.convergence import Convergence, check_convergence
from pipeline.data import StageInputs
from pipeline.models import load_state_dict
from pipeline.schema import BaselineSettings
from pipeline.training import fit

log = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    model: nn.Module
    source: str  # "checkpoint", "cache" or "trained"
    weights_path: Path | None
    history: list[dict] = field(default_factory=list)
    convergence: Convergence | None = None  # None: weights from a checkpoint, history unknown


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
        weights, metadata = load_weights(cache_path)
        model.load_state_dict(weights)
        # The training history travels with the weights, so a cached baseline is judged the same.
        history = json.loads(metadata.get("history", "[]"))
        return BaselineResult(
            model.to(device), "cache", cache_path, history, converged(history, settings)
        )

    result = fit(model, inputs.loaders, inputs.criterion, settings, device, desc="baseline")
    if cache_path is not None:
        metadata = {"best_epoch": str(result.best_epoch), "history": json.dumps(result.history)}
        save_weights(model.state_dict(), cache_path, metadata=metadata)
    return BaselineResult(
        model, "trained", cache_path, result.history, converged(result.history, settings)
    )


def converged(history: list[dict], settings: BaselineSettings) -> Convergence:
    """The convergence check (pipeline.convergence), with a warning line when it fails."""
    verdict = check_convergence(
        history, settings.convergence.window, settings.convergence.tolerance
    )
    if not verdict.converged:
        log.warning(
            "the baseline had not converged: %s; raise baseline.epochs, or read the accuracy "
            "change as partly extra training",
            verdict.reason,
        )
    return verdict
