"""Stage 3: NNI ModelSpeedup turns masks into a physically smaller model."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from pipeline.errors import SpeedupError
from pipeline.stages.prune import Masks, quiet_nni, trace_shape

log = logging.getLogger(__name__)


def speedup(
    model: nn.Module,
    masks: Masks,
    input_shape: tuple[int, int, int],
    confidence: int,
    trace_size: int | None = None,
) -> nn.Module:
    """Replace masked layers by narrower ones; `confidence` is the batch size of NNI's inference.

    With `trace_size`, NNI infers the masks on trace_size x trace_size inputs (much cheaper at
    224). NNI infers which channels survive from `confidence` random samples and now and then
    drops one that is merely zero on all of them, leaving mismatched widths; the result is
    checked at the real input size and, on a mismatch, redone with 4x the samples and then at
    the real size before giving up.
    """
    if not masks:
        return model
    shape = trace_shape(model, input_shape, trace_size)
    attempts = [(shape, confidence), (shape, confidence * 4), (input_shape, confidence * 4)]
    attempts = list(dict.fromkeys(attempts))  # drop repeats, keep the order
    for number, (attempt_shape, samples) in enumerate(attempts, start=1):
        candidate = copy.deepcopy(model) if number < len(attempts) else model
        try:
            return _speedup(candidate, masks, attempt_shape, samples, check_shape=input_shape)
        except SpeedupError as error:
            if number == len(attempts):
                raise
            log.warning("speedup attempt %d failed (%s); retrying", number, error)
    raise AssertionError("unreachable")


def _speedup(
    model: nn.Module,
    masks: Masks,
    shape: tuple[int, ...],
    confidence: int,
    check_shape: tuple[int, ...],
) -> nn.Module:
    from nni.compression.pytorch.speedup import ModelSpeedup

    quiet_nni()
    device = next(model.parameters()).device
    dummy_input = torch.rand(confidence, *shape, device=device)
    model.eval()
    ModelSpeedup(model, dummy_input, masks, confidence=confidence).speedup_model()
    try:
        with torch.no_grad():
            model(torch.rand(2, *check_shape, device=device))
    except RuntimeError as error:
        # NNI infers which channels survive from `confidence` random samples; too few samples
        # can mislead it into mismatched layer widths.
        raise SpeedupError(
            f"pruner.confidence={confidence}: ModelSpeedup produced inconsistent layer widths "
            f"({str(error).splitlines()[0]}); raise pruner.confidence (8 or more)"
        ) from None
    return model
