"""Stage 4: fine-tune the pruned model, keeping the epoch with the best validation accuracy."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.data import Loaders
from pipeline.schema import FinetuneSchema
from pipeline.training import FitResult, fit


def finetune(
    model: nn.Module,
    loaders: Loaders,
    criterion: Callable,
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    settings: FinetuneSchema,
    device: torch.device,
    max_batches: int | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    model.to(device)
    optimizer = optimizer_factory(model.parameters(), lr=settings.lr)
    return fit(
        model,
        loaders.train,
        loaders.val,
        criterion,
        optimizer,
        settings.epochs,
        device,
        max_batches=max_batches,
        desc="finetune",
        on_epoch=on_epoch,
    )
