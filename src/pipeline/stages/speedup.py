"""Stage 3: NNI's ModelSpeedup turns masks into a physically smaller model, whose BatchNorm
statistics are then re-estimated for the narrower network."""

from __future__ import annotations

from torch import nn

from pipeline.data import StageInputs
from pipeline.nni_adapter import Masks
from pipeline.nni_adapter import speedup as nni_speedup
from pipeline.schema import PrunerSettings
from pipeline.training import recalibrate_batchnorm


def speedup(
    model: nn.Module,
    masks: Masks,
    inputs: StageInputs,
    settings: PrunerSettings,
    recalibrate: bool = True,
) -> nn.Module:
    """Remove the masked channels (see nni_adapter.speedup for the checks and retries), then,
    with `recalibrate`, re-estimate BatchNorm statistics from settings.recalibration_batches
    training batches."""
    smaller = nni_speedup(
        model, masks, inputs.input_shape, settings.confidence, settings.trace_input_size
    )
    if not recalibrate:
        return smaller
    return recalibrate_batchnorm(
        smaller, inputs.loaders.train, settings.recalibration_batches, inputs.device
    )
