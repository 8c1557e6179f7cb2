"""Stage 2: channel masks from the pruning engine's ranking, on the unchanged architecture."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from pipeline.config.schema import LayerScale, PrunerSettings
from pipeline.data.datasets import StageInputs
from pipeline.files import atomic_path
from pipeline.pruning.config_list import resolve_config_list
from pipeline.pruning.engine import Masks, TiedLayers, engine_for


@dataclass
class PruneResult:
    model: nn.Module  # original layer shapes; the speedup stage removes the masked channels
    masks: Masks
    config_list: list[dict[str, Any]]
    # The tied layers the engine found (or was given); valid for the narrower model too.
    tied: TiedLayers | None = None


def prune(
    model: nn.Module,
    inputs: StageInputs,
    settings: PrunerSettings,
    sparsity: float,
    steps: int = 1,
    tied: TiedLayers | None = None,
) -> PruneResult:
    """Rank output channels and mask the lowest-ranked ones; with `steps` > 1, this call is one
    of that many equal steps towards `sparsity`. inputs.loaders.train feeds the statistics.
    `tied` layers from an earlier prune of this model (or a wider version of it) spare the
    engine's dependency trace."""
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
        return PruneResult(model, {}, config_list, tied)
    masks, tied = engine_for(settings).channel_masks(model, config_list, settings, inputs, tied)
    return PruneResult(model, masks, config_list, tied)


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
