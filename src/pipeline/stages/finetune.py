"""Stage 4: fine-tune the pruned model, keeping the epoch with the best validation accuracy."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.data import StageInputs
from pipeline.schema import FinetuneSettings
from pipeline.training import Distillation, FitResult, fit


def split_epochs(settings: FinetuneSettings, iterations: int) -> tuple[int, int]:
    """finetune.epochs split into (epochs after each pruning step but the last, epochs after
    the last). The first is finetune.between_steps, or 0 when the steps would take every epoch
    (a short test run, finetune.epochs=0): the model after the last step is what users ship,
    so it keeps at least one epoch."""
    spent = settings.between_steps * (iterations - 1)
    between = settings.between_steps if 0 < spent < settings.epochs else 0
    return between, settings.epochs - between * (iterations - 1)


def finetune(
    model: nn.Module,
    inputs: StageInputs,
    settings: FinetuneSettings,
    teacher: nn.Module | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train the pruned model; with finetune.distill set, `teacher` (the baseline) guides it."""
    distillation = None
    if settings.distill is not None and teacher is not None:
        distillation = Distillation(
            teacher.to(inputs.device), settings.distill.alpha, settings.distill.temperature
        )
    return fit(
        model,
        inputs.loaders,
        inputs.criterion,
        settings,
        inputs.device,
        desc="finetune",
        on_epoch=on_epoch,
        distillation=distillation,
    )
