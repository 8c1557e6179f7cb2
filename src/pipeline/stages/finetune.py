"""Stage 4: fine-tune the pruned model, keeping the epoch with the best validation accuracy."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.config.schema import DropoutRule, FinetuneSettings
from pipeline.data.datasets import StageInputs
from pipeline.training.distributed import SINGLE, World
from pipeline.training.loop import Distillation, FitResult, fit

log = logging.getLogger(__name__)


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
    world: World = SINGLE,
    precision: str = "32",
) -> FitResult:
    """Train the pruned model; with finetune.distill set, `teacher` (the baseline) guides it.
    With finetune.dropout=scaled its dropout rates are first lowered as its layers were pruned
    against `teacher` (scale_dropout)."""
    if settings.dropout == DropoutRule.scaled and teacher is not None:
        changed = scale_dropout(model, teacher, inputs.input_shape)
        if changed:
            log.info(
                "finetune.dropout=scaled: %s",
                ", ".join(f"{name} {old:.3f} -> {new:.3f}" for name, (old, new) in changed.items()),
            )
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
        ema_decay=settings.ema_decay,
        precision=precision,
        world=world,
    )


def scale_dropout(
    model: nn.Module, original: nn.Module, input_shape: tuple[int, ...]
) -> dict[str, tuple[float, float]]:
    """Set the rate of every nn.Dropout of `model` to the original's rate times the square root
    of the share of weights kept in the layer its units feed next (the first Linear or Conv2d
    that runs after it), as Han et al. 2015 (Learning both Weights and Connections, section
    3.2) scale dropout for a pruned network: fewer connections co-adapt less, and a pruned
    layer's full dropout rate makes the fine-tuning fight its smaller capacity. `original` is
    the unpruned model with the same module names. The order is the forward pass's (one call on
    zeros of `input_shape`), not the order the modules were declared in. Returns
    {dropout name: (rate before, rate now)} of the rates that changed; a dropout with no layer
    after it, or whose layer the original lacks, keeps its rate."""
    originals = dict(original.named_modules())
    ran: list[str] = []
    names = {module: name for name, module in model.named_modules()}
    hooks = [
        module.register_forward_pre_hook(lambda m, _: ran.append(names[m]))
        for module in names
        if isinstance(module, (nn.Dropout, nn.Linear, nn.Conv2d))
    ]
    parameter = next(model.parameters())
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    modules = dict(model.named_modules())
    changed = {}
    for index, name in enumerate(ran):
        dropout = modules[name]
        if not isinstance(dropout, nn.Dropout) or not isinstance(originals.get(name), nn.Dropout):
            continue
        fed = next((n for n in ran[index + 1 :] if not isinstance(modules[n], nn.Dropout)), None)
        if fed is None or not hasattr(originals.get(fed), "weight"):
            continue
        kept = modules[fed].weight.numel() / originals[fed].weight.numel()
        rate = originals[name].p * math.sqrt(min(1.0, kept))
        if rate != dropout.p:
            changed[name] = (dropout.p, rate)
            dropout.p = rate
    return changed
