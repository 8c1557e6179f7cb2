"""Stage 2: channel masks from activation statistics, on the unchanged architecture."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from pipeline.config_list import resolve_config_list
from pipeline.data import StageInputs
from pipeline.files import atomic_path
from pipeline.nni_adapter import LayerDependencies, Masks, channel_masks
from pipeline.schema import LayerScale, PrunerSettings


@dataclass
class PruneResult:
    model: nn.Module  # original layer shapes, NNI wrappers removed; speedup removes the channels
    masks: Masks
    config_list: list[dict[str, Any]]
    # The layer dependencies NNI found (or was given); valid for the narrower model too.
    dependencies: LayerDependencies | None = None


def prune(
    model: nn.Module,
    inputs: StageInputs,
    settings: PrunerSettings,
    sparsity: float,
    steps: int = 1,
    dependencies: LayerDependencies | None = None,
) -> PruneResult:
    """Rank output channels and mask the lowest-ranked ones; with `steps` > 1, this call is one
    of that many equal steps towards `sparsity`. inputs.loaders.train feeds the statistics.
    `dependencies` from an earlier prune of this model (or a wider version of it) spare NNI's
    dependency trace."""
    config_list = resolve_config_list(
        settings.config_list,
        sparsity,
        settings.exclude_last_layer,
        model,
        settings.round_to,
        steps,
        LayerScale.as_mapping(settings.sparsity_scale),
    )
    model.to(inputs.device)
    if all(entry.get("exclude") for entry in config_list):
        # Rounding kept every channel (tiny sparsity, narrow layers): nothing to prune.
        return PruneResult(model, {}, config_list, dependencies)
    masks, dependencies = channel_masks(
        model,
        config_list,
        settings,
        inputs.loaders.train,
        inputs.criterion,
        inputs.device,
        inputs.input_shape,
        dependencies,
    )
    return PruneResult(model, masks, config_list, dependencies)


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
    with atomic_path(path) as staging:
        save_file(flat, staging, metadata={"steps": str(len(masks_by_step))})
    return path
