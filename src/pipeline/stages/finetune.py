"""Stage 4: fine-tune the pruned model, keeping the epoch with the best validation accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.data import Loaders
from pipeline.schema import FinetuneSchema
from pipeline.training import Distillation, FitResult, fit


def lr_schedule(optimizer, epochs: int, schedule: str, warmup_epochs: int):
    """constant, or linear warm-up then cosine decay, stepped once per epoch."""
    if schedule == "constant":
        return None

    def factor(epoch: int) -> float:  # epoch: the number of epochs finished
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def finetune(
    model: nn.Module,
    loaders: Loaders,
    criterion: Callable,
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    settings: FinetuneSchema,
    device: torch.device,
    max_batches: int | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    teacher: nn.Module | None = None,
) -> FitResult:
    """Train the pruned model; with finetune.distill set, `teacher` (the baseline) guides it."""
    model.to(device)
    optimizer = optimizer_factory(model.parameters(), lr=settings.lr)
    distillation = None
    if settings.distill is not None and teacher is not None:
        distillation = Distillation(
            teacher.to(device), settings.distill.alpha, settings.distill.temperature
        )
    return fit(
        model,
        loaders.train,
        loaders.val,
        criterion,
        optimizer,
        settings.epochs,
        device,
        max_batches=max_batches,
        scheduler=lr_schedule(
            optimizer, settings.epochs, settings.schedule.value, settings.warmup_epochs
        ),
        desc="finetune",
        on_epoch=on_epoch,
        distillation=distillation,
    )
