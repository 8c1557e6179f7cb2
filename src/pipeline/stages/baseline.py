"""Stage 1: the unpruned model, from a checkpoint, from the cache, or trained here."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from pipeline.config.schema import BaselineSettings
from pipeline.data.datasets import StageInputs
from pipeline.files import file_lock
from pipeline.models.baseline_cache import load_weights, save_weights
from pipeline.models.zoo import load_state_dict, state_dict_mismatch
from pipeline.training.convergence import Convergence, check_convergence
from pipeline.training.distributed import SINGLE, World, broadcast_json, broadcast_state
from pipeline.training.loop import fit

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
    world: World = SINGLE,
    precision: str = "32",
) -> BaselineResult:
    """Fill `model` with baseline weights: the checkpoint if given, else cached, else trained.

    Training and caching happen under a lock on the cache entry: jobs running at the same time
    train it once, and the others wait for it instead of training their own copy. Over several
    ranks (`world`), rank 0 alone holds the lock, reads and writes the cache; a cached entry
    reaches the other ranks from it, and a missing one is trained by all of them together.
    """
    device = inputs.device
    if settings.checkpoint:
        model.load_state_dict(load_state_dict(settings.checkpoint, key="baseline.checkpoint"))
        return BaselineResult(model.to(device), "checkpoint", Path(settings.checkpoint))
    if cache_path is None:
        return trained(model, inputs, settings, None, world, precision)
    with file_lock(cache_path) if world.main else contextlib.nullcontext():
        # The training history travels with the weights, so a cached baseline is judged the same.
        history = from_cache(model, cache_path) if world.main else None
        history = broadcast_json(history, world)
        if history is not None:
            model = model.to(device)
            broadcast_state(model, world)
            verdict = converged(history, settings)
            return BaselineResult(model, "cache", cache_path, history, verdict)
        return trained(model, inputs, settings, cache_path, world, precision)


def from_cache(model: nn.Module, cache_path: Path) -> list[dict] | None:
    """Load the cached weights into `model` and return their training history; None when there
    is no entry, or when it is unreadable or does not fit the model: it is then removed and
    trained again (a cache entry can always be made again, so it never stops a run)."""
    if not cache_path.is_file():
        return None
    try:
        weights, metadata = load_weights(cache_path)
        history = json.loads(metadata.get("history", "[]"))
    except Exception as error:  # truncated, overwritten or foreign files all end the same way
        reason = f"{type(error).__name__}: {str(error).strip()[:120]}"
    else:
        mismatch = state_dict_mismatch(weights, model)
        if mismatch is None:
            model.load_state_dict(weights)
            return history
        reason = f"it does not fit the model: {mismatch}"
    log.warning("the cached baseline %s is unusable (%s); training it again", cache_path, reason)
    cache_path.unlink(missing_ok=True)
    return None


def trained(
    model: nn.Module,
    inputs: StageInputs,
    settings: BaselineSettings,
    cache_path: Path | None,
    world: World = SINGLE,
    precision: str = "32",
) -> BaselineResult:
    result = fit(
        model,
        inputs.loaders,
        inputs.criterion,
        settings,
        inputs.device,
        desc="baseline",
        precision=precision,
        world=world,
    )
    if cache_path is not None and world.main:
        metadata = {"best_epoch": str(result.best_epoch), "history": json.dumps(result.history)}
        save_weights(model.state_dict(), cache_path, metadata=metadata)
    return BaselineResult(
        model, "trained", cache_path, result.history, converged(result.history, settings)
    )


def converged(history: list[dict], settings: BaselineSettings) -> Convergence:
    """The convergence check (pipeline.training.convergence), with a warning line when it fails."""
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
