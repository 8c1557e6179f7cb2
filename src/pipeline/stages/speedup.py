"""Stage 3: the pruning engine turns masks into a physically smaller model (NNI's ModelSpeedup),
whose BatchNorm statistics are then re-estimated for the narrower network."""

from __future__ import annotations

from torch import nn

from pipeline.config.schema import PrunerSettings
from pipeline.data.datasets import StageInputs
from pipeline.pruning.engine import Masks, engine_for
from pipeline.training.loop import recalibrate_batchnorm


def speedup(
    model: nn.Module,
    masks: Masks,
    inputs: StageInputs,
    settings: PrunerSettings,
    recalibrate: bool = True,
) -> nn.Module:
    """Remove the masked channels (the engine's narrow: checks and retries), then,
    with `recalibrate`, re-estimate BatchNorm statistics from settings.recalibration_batches
    training batches."""
    smaller = engine_for(settings).narrow(model, masks, inputs.input_shape, settings)
    if not recalibrate:
        return smaller
    return recalibrate_batchnorm(
        smaller, inputs.loaders.train, settings.recalibration_batches, inputs.device
    )
