"""Stages 2 and 3 in several steps: prune and speed up pruner.iterations times, each step
removing the same fraction of what the last one left, and re-estimate BatchNorm statistics;
optionally fine-tune between the steps."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipeline.data import StageInputs
from pipeline.nni_adapter import LayerDependencies, Masks
from pipeline.schema import PrunerSettings, Recalibration
from pipeline.stages.prune import prune
from pipeline.stages.speedup import speedup


@dataclass
class SteppedResult:
    model: nn.Module  # physically smaller, BatchNorm statistics re-estimated
    masks_by_step: list[Masks]  # each on the model the step before left
    config_list: list[dict[str, Any]]  # the last step's
    dependencies: LayerDependencies | None  # NNI's layer dependencies, for a later prune


def _untimed(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def prune_in_steps(
    model: nn.Module,
    inputs: StageInputs,
    settings: PrunerSettings,
    sparsity: float,
    stage: Callable[[str], AbstractContextManager] = _untimed,
    on_step: Callable[[int, nn.Module, bool], None] | None = None,
    dependencies: LayerDependencies | None = None,
    between: Callable[[int, nn.Module], nn.Module] | None = None,
) -> SteppedResult:
    """Prune a copy of `model` to `sparsity` in settings.iterations steps.

    Each step ranks channels on the model the previous step left. BatchNorm statistics are
    re-estimated (see recalibrate_batchnorm) after the last step, and with
    settings.recalibrate=every_step after every step, so that later steps rank on statistics
    that fit the narrower network. With settings.round_to each step rounds the layer's
    current width, so a narrow layer whose step would remove less than half a multiple is left
    alone: the stem and the 16-32 channel bottlenecks, which accuracy hangs on, are pruned less
    than in one-shot pruning and the wide layers as asked (on Fashion-MNIST at sparsity 0.5:
    1.08 M instead of 1.06 M parameters). `stage(name)` wraps the prune and the speedup part of
    every step (the run's monitor times them); `on_step(index, model, recalibrated)` sees the
    model after each step, and whether its BatchNorm statistics were re-estimated for it.
    NNI's layer dependencies are traced once (or taken from `dependencies`, found on this
    model before) and given to every later step: pruning narrows layers but leaves the graph
    as it was. `between(index, model)`, after every step but the last, returns the model the
    next step prunes (the run fine-tunes it there: finetune.between_steps).
    """
    current = copy.deepcopy(model)  # NNI prunes in place: keep the caller's model intact
    masks_by_step, config_list = [], []
    for index in range(1, settings.iterations + 1):
        with stage("prune"):
            pruned = prune(current, inputs, settings, sparsity, settings.iterations, dependencies)
        dependencies = pruned.dependencies
        # ModelSpeedup rewrites the masks it is given; keep this step's as the pruner made them.
        masks_by_step.append(copy.deepcopy(pruned.masks))
        config_list = pruned.config_list
        recalibrate = (
            index == settings.iterations or settings.recalibrate == Recalibration.every_step
        )
        with stage("speedup"):
            current = speedup(pruned.model, pruned.masks, inputs, settings, recalibrate)
        if on_step is not None:
            on_step(index, current, recalibrate)
        if between is not None and index < settings.iterations:
            current = between(index, current)
    return SteppedResult(current, masks_by_step, config_list, dependencies)
