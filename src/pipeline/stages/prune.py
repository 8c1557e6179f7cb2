"""Stage 2: NNI 2.10.1 activation pruning; produces channel masks on the unchanged architecture."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from pipeline.inference import fold_batchnorm
from pipeline.schema import PrunerSchema
from pipeline.training import cycled_batches, train_steps

Masks = dict[str, dict[str, torch.Tensor]]


@dataclass
class PruneResult:
    model: nn.Module  # original layer shapes, NNI wrappers removed; speedup removes the channels
    masks: Masks
    config_list: list[dict[str, Any]]


# NNI config-list keys that hold a sparsity (max_sparsity_per_layer is a cap, left alone).
SPARSITY_KEYS = ("sparsity", "sparsity_per_layer", "total_sparsity")


def step_sparsity(sparsity: float, count: int) -> float:
    """The fraction of the remaining channels one of `count` equal steps removes."""
    if count == 1:
        return sparsity  # exactly: NNI rounds channel counts from it
    return 1.0 - (1.0 - sparsity) ** (1.0 / count)


NNI_PLAIN_LOGGERS = ("FixMaskConflict", "Shape_Dependency", "torch apply compression")


def quiet_nni() -> None:
    """NNI logs every wrapped and replaced module at INFO; keep warnings and errors only."""
    # NNI gives its module loggers explicit levels, so the parent's level is not enough.
    names = [name for name in logging.root.manager.loggerDict if name.startswith("nni")]
    # A few of its utilities log under names of their own.
    for name in ["nni", *names, *NNI_PLAIN_LOGGERS]:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Warns on every pruning call that it had no model to unbind: nothing to act on.
    logging.getLogger("nni.algorithms.compression.v2.pytorch.utils.evaluator").setLevel(
        logging.ERROR
    )


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
    round_to: int | None = None,
    steps: int = 1,
) -> list[dict[str, Any]]:
    """The user's NNI config list, or the default one built from `sparsity`, plus the exclusion.

    With `round_to`, the default list becomes one entry per layer that keeps a multiple of
    `round_to` channels (see rounded_config_list). With `steps` > 1 (iterative pruning) every
    sparsity becomes that of one of `steps` equal steps, applied to the model as the earlier
    steps left it, so that after all of them the kept fraction is 1 - sparsity (before rounding).
    """
    last = last_linear_name(model) if exclude_last_layer else None
    if config_list is not None:
        resolved = [dict(entry) for entry in config_list]
        for entry in resolved:
            for key in SPARSITY_KEYS:
                if key in entry:
                    entry[key] = step_sparsity(float(entry[key]), steps)
    elif round_to:
        resolved = rounded_config_list(model, step_sparsity(sparsity, steps), round_to, {last})
    else:
        total = step_sparsity(sparsity, steps)
        resolved = [{"total_sparsity": total, "op_types": ["Conv2d", "Linear"]}]
    if last is not None:
        resolved.append({"exclude": True, "op_names": [last]})
    return resolved


def is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def rounded_config_list(
    model: nn.Module, sparsity: float, round_to: int, skip: set[str | None]
) -> list[dict[str, Any]]:
    """Per-layer sparsities that keep the multiple of `round_to` nearest to (1 - sparsity) * C
    channels (at least `round_to`, at most C).

    Vectorised kernels block channels (oneDNN on AVX-512 by 16), and odd counts fall off the
    fast paths: benchmarks/latency.py showed NNI's own counts making MobileNetV2 slower at
    sparsity 0.05 and no faster at 0.15. NNI keeps the highest-ranked channels, so a layer that
    rounds up re-admits the best of those it would have removed; in dependency_aware mode layers
    tied by a residual add have equal widths, hence equal sparsities, and stay consistent.
    Depthwise convolutions are left out: they follow the layer that feeds them. Pruning both
    independently removes the union of two channel sets, about 1 - (1 - s)^2 of the channels,
    at odd counts.
    """
    entries = []
    for name, module in model.named_modules():
        if name in skip or is_depthwise(module):
            continue
        if isinstance(module, nn.Conv2d):
            channels = module.out_channels
        elif isinstance(module, nn.Linear):
            channels = module.out_features
        else:
            continue
        multiples = math.floor((1.0 - sparsity) * channels / round_to + 0.5)  # nearest
        keep = min(channels, max(round_to, multiples * round_to))
        if keep < channels:
            # NNI prunes int(s * C) channels; +0.5 keeps float error from dropping one more.
            entries.append(
                {"sparsity_per_layer": (channels - keep + 0.5) / channels, "op_names": [name]}
            )
    return entries


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


def observe_func(loader: DataLoader, device: torch.device, batches: int) -> Callable:
    """A stand-in for NNI's training function that only looks: `batches` forward passes in eval
    mode, no gradient, no optimizer step, whatever max_steps NNI asks for."""

    @torch.no_grad()
    def training_func(
        model, optimizers, criterion, lr_schedulers=None, max_steps=None, max_epochs=None
    ):
        model.eval()
        for images, _ in cycled_batches(loader, batches):
            model(images.to(device))

    return training_func


def prune(
    model: nn.Module,
    settings: PrunerSchema,
    sparsity: float,
    train_loader: Iterable,
    criterion: Callable,
    device: torch.device,
    input_shape: tuple[int, int, int],
    steps: int = 1,
) -> PruneResult:
    """Rank output channels by activation statistics and mask the lowest-ranked ones; with
    `steps` > 1, this call is one of that many equal steps towards `sparsity`."""
    import nni
    from nni.algorithms.compression.v2.pytorch import TorchEvaluator
    from nni.compression.pytorch.pruning import ActivationAPoZRankPruner, ActivationMeanRankPruner

    quiet_nni()
    pruner_class = {"apoz": ActivationAPoZRankPruner, "mean_rank": ActivationMeanRankPruner}
    config_list = resolve_config_list(
        settings.config_list, sparsity, settings.exclude_last_layer, model, settings.round_to, steps
    )
    model.to(device)
    if all(entry.get("exclude") for entry in config_list):
        # Rounding kept every channel (tiny sparsity, narrow layers): nothing to prune.
        return PruneResult(model, {}, config_list)
    dummy_input = torch.rand(
        settings.confidence,
        *trace_shape(model, input_shape, settings.trace_input_size),
        device=device,
    )
    if settings.statistics == "activation":
        # NNI hooks each layer's own output (a conv's is taken before its BatchNorm), applies
        # `activation` itself, and stops adding once the *samples* seen reach training_steps,
        # while its evaluator trains the model for training_steps *batches*. To rank channels
        # by the activation the network really produces: rank on a copy with BatchNorm folded
        # into the convolutions (so a conv's output is the BN output), feed it exactly
        # training_steps batches forward-only in eval mode, and give NNI a sample budget that
        # covers them all. Masks are keyed by layer name, so they apply to `model` unchanged.
        target = fold_batchnorm(copy.deepcopy(model).eval())
        batch_size = getattr(train_loader, "batch_size", None) or 1
        nni_steps = settings.training_steps * batch_size
        training_func = observe_func(train_loader, device, settings.training_steps)
    else:
        target, nni_steps = model, settings.training_steps
        training_func = nni_training_func(train_loader, device)
    # NNI re-creates the optimizer for the wrapped model, so it must be traced.
    optimizer = nni.trace(torch.optim.Adam)(target.parameters(), lr=settings.lr)
    evaluator = TorchEvaluator(training_func, optimizer, criterion, dummy_input=dummy_input)
    pruner = pruner_class[settings.type](
        target,
        config_list,
        evaluator,
        training_steps=nni_steps,
        activation=settings.activation,
        mode=settings.mode,
        dummy_input=dummy_input,
    )
    _, masks = pruner.compress()
    pruner._unwrap_model()
    return PruneResult(model, masks, config_list)


def trace_shape(
    model: nn.Module, input_shape: tuple[int, int, int], trace_size: int | None
) -> tuple[int, ...]:
    """The shape of NNI's dummy inputs: channel masks and the dependencies between layers do not
    depend on the spatial size, so a small one makes tracing and mask inference far cheaper.
    A model that cannot run at the small size (a Flatten before a Linear) keeps the real one."""
    channels, height, width = input_shape
    if trace_size is None or trace_size >= max(height, width):
        return input_shape
    small = (channels, trace_size, trace_size)
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *small, device=device))
    except RuntimeError:
        return input_shape
    finally:
        model.train(was_training)
    return small


def save_masks(masks_by_step: list[Masks], path: Path) -> Path:
    """Masks as one safetensors file, keys `<layer>.<parameter>`; with several pruning steps
    (each on the model the previous one left), keys `step<k>/<layer>.<parameter>`."""
    several = len(masks_by_step) > 1
    flat = {}
    for index, masks in enumerate(masks_by_step, start=1):
        prefix = f"step{index}/" if several else ""
        for layer, layer_masks in masks.items():
            for name, mask in layer_masks.items():
                if mask is not None:
                    flat[f"{prefix}{layer}.{name}"] = mask.detach().cpu().contiguous()
    save_file(flat, path, metadata={"steps": str(len(masks_by_step))})
    return path
