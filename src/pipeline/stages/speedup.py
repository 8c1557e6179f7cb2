"""Stage 3: NNI ModelSpeedup turns masks into a physically smaller model."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import SpeedupError
from pipeline.stages.prune import Masks, quiet_nni


def speedup(
    model: nn.Module, masks: Masks, input_shape: tuple[int, int, int], confidence: int
) -> nn.Module:
    """Replace masked layers by narrower ones; `confidence` is the batch size of NNI's inference."""
    from nni.compression.pytorch.speedup import ModelSpeedup

    if not masks:
        return model
    quiet_nni()
    device = next(model.parameters()).device
    dummy_input = torch.rand(confidence, *input_shape, device=device)
    model.eval()
    ModelSpeedup(model, dummy_input, masks, confidence=confidence).speedup_model()
    try:
        with torch.no_grad():
            model(dummy_input)
    except RuntimeError as error:
        # NNI infers which channels survive from `confidence` random samples; too few samples
        # can mislead it into mismatched layer widths.
        raise SpeedupError(
            f"pruner.confidence={confidence}: ModelSpeedup produced inconsistent layer widths "
            f"({str(error).splitlines()[0]}); raise pruner.confidence (8 or more)"
        ) from None
    return model
