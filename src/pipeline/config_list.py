"""Pure policy for NNI config lists: the sparsity of each pruning step, rounded channel counts,
the exclusion of the last layer. Plain data in and out; no NNI import."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from pipeline.models import output_layer_name

# NNI config-list keys that hold a sparsity (max_sparsity_per_layer is a cap, left alone).
SPARSITY_KEYS = ("sparsity", "sparsity_per_layer", "total_sparsity")


def step_sparsity(sparsity: float, count: int) -> float:
    """The fraction of the remaining channels one of `count` equal steps removes."""
    if count == 1:
        return sparsity  # exactly: NNI rounds channel counts from it
    return 1.0 - (1.0 - sparsity) ** (1.0 / count)


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
    last = output_layer_name(model) if exclude_last_layer else None
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
