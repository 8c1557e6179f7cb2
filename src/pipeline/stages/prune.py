"""Stage 2: NNI 2.10.1 activation pruning; produces channel masks on the unchanged architecture."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from pipeline.schema import PrunerSchema
from pipeline.training import train_steps

Masks = dict[str, dict[str, torch.Tensor]]


@dataclass
class PruneResult:
    model: nn.Module  # original layer shapes, pruned channels zeroed, NNI wrappers removed
    masks: Masks
    config_list: list[dict[str, Any]]


def quiet_nni() -> None:
    """NNI logs every wrapped and replaced module at INFO; keep warnings and errors only."""
    # NNI gives its module loggers explicit levels, so the parent's level is not enough.
    names = [name for name in logging.root.manager.loggerDict if name.startswith("nni")]
    for name in ["nni", *names]:
        logging.getLogger(name).setLevel(logging.WARNING)


def last_linear_name(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("pruner.exclude_last_layer=true needs a model with a Linear layer")
    return names[-1]


def resolve_config_list(
    config_list: list[dict[str, Any]] | None,
    sparsity: float,
    exclude_last_layer: bool,
    model: nn.Module,
) -> list[dict[str, Any]]:
    """The user's NNI config list, or the default one built from `sparsity`, plus the exclusion."""
    if config_list is None:
        config_list = [{"total_sparsity": sparsity, "op_types": ["Conv2d", "Linear"]}]
    resolved = [dict(entry) for entry in config_list]
    if exclude_last_layer:
        resolved.append({"exclude": True, "op_names": [last_linear_name(model)]})
    return resolved


def nni_training_func(loader: DataLoader, device: torch.device) -> Callable:
    """The training function NNI's TorchEvaluator calls; max_steps counts optimizer steps."""

    def training_func(
        model, optimizers, criterion, lr_schedulers=None, max_steps=None, max_epochs=None
    ):
        optimizer = optimizers[0] if isinstance(optimizers, (list, tuple)) else optimizers
        if max_steps is None:
            for _ in range(max_epochs or 1):
                train_steps(model, loader, criterion, optimizer, device, desc="prune stats")
            return
        remaining = max_steps
        while remaining > 0:  # a short loader is cycled until max_steps batches have run
            steps = min(remaining, len(loader))
            train_steps(model, loader, criterion, optimizer, device, steps, desc="prune stats")
            remaining -= steps

    return training_func


def prune(
    model: nn.Module,
    settings: PrunerSchema,
    sparsity: float,
    train_loader: Iterable,
    criterion: Callable,
    device: torch.device,
    input_shape: tuple[int, int, int],
) -> PruneResult:
    """Rank output channels by activation statistics and mask the lowest-ranked ones."""
    import nni
    from nni.algorithms.compression.v2.pytorch import TorchEvaluator
    from nni.compression.pytorch.pruning import ActivationAPoZRankPruner, ActivationMeanRankPruner

    quiet_nni()
    pruner_class = {"apoz": ActivationAPoZRankPruner, "mean_rank": ActivationMeanRankPruner}
    config_list = resolve_config_list(
        settings.config_list, sparsity, settings.exclude_last_layer, model
    )
    model.to(device)
    dummy_input = torch.rand(settings.confidence, *input_shape, device=device)
    # NNI re-creates the optimizer for the wrapped model, so it must be traced.
    optimizer = nni.trace(torch.optim.Adam)(model.parameters(), lr=settings.lr)
    evaluator = TorchEvaluator(
        nni_training_func(train_loader, device), optimizer, criterion, dummy_input=dummy_input
    )
    pruner = pruner_class[settings.type](
        model,
        config_list,
        evaluator,
        training_steps=settings.training_steps,
        activation=settings.activation,
        mode=settings.mode,
        dummy_input=dummy_input,
    )
    _, masks = pruner.compress()
    pruner._unwrap_model()
    return PruneResult(model, masks, config_list)


def save_masks(masks: Masks, path: Path) -> Path:
    """Masks as one safetensors file, keys `<layer>.<parameter>`."""
    flat = {
        f"{layer}.{name}": mask.detach().cpu().contiguous()
        for layer, layer_masks in masks.items()
        for name, mask in layer_masks.items()
        if mask is not None
    }
    save_file(flat, path)
    return path
