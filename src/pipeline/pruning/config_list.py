"""Pure policy for NNI config lists: the sparsity of each pruning step, rounded channel counts,
the exclusion of the last layer. Plain data in and out; no NNI import."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.zoo import output_layer_name

# NNI config-list keys that hold a sparsity (max_sparsity_per_layer is a cap, left alone).
SPARSITY_KEYS = ("sparsity", "sparsity_per_layer", "total_sparsity")
# A scaled layer loses at most this share of its channels (NNI refuses 1.0).
MAX_LAYER_SPARSITY = 0.95


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
    scales: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The user's NNI config list, or the default one built from `sparsity`, plus the exclusion.

    With `round_to`, the default list becomes one entry per layer that keeps a multiple of
    `round_to` channels (see rounded_config_list). With `steps` > 1 (iterative pruning) every
    sparsity becomes that of one of `steps` equal steps, applied to the model as the earlier
    steps left it, so that after all of them the kept fraction is 1 - sparsity (before rounding).
    `scales` (pruner.sparsity_scale) multiply the sparsity of the layers their patterns match;
    the default list is then one entry per layer, rounded or not.
    """
    last = output_layer_name(model) if exclude_last_layer else None
    if config_list is not None:
        resolved = [dict(entry) for entry in config_list]
        for entry in resolved:
            for key in SPARSITY_KEYS:
                if key in entry:
                    entry[key] = step_sparsity(float(entry[key]), steps)
    elif round_to or scales:
        layer_sparsity = scaled_sparsity(model, sparsity, scales or {}, {last})
        resolved = per_layer_config_list(
            model, lambda name: step_sparsity(layer_sparsity(name), steps), round_to, {last}
        )
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


def prunable_layers(model: nn.Module, skip: set[str | None]) -> dict[str, int]:
    """Output widths of the layers the default config list prunes: convolutions (depthwise ones
    follow the layer that feeds them) and linear layers, less `skip`."""
    widths = {}
    for name, module in model.named_modules():
        if name in skip or is_depthwise(module):
            continue
        if isinstance(module, nn.Conv2d):
            widths[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            widths[name] = module.out_features
    return widths


def scaled_sparsity(
    model: nn.Module, sparsity: float, scales: Mapping[str, float], skip: set[str | None]
) -> Callable[[str], float]:
    """The sparsity of each layer: `sparsity` times the factor of the first pattern in `scales`
    (fnmatch, on the layer's name) that matches it, at most MAX_LAYER_SPARSITY. A pattern that
    matches no prunable layer is an error: a misspelt name would otherwise change nothing."""
    names = list(prunable_layers(model, skip))
    for pattern in scales:
        if not any(fnmatchcase(name, pattern) for name in names):
            raise ConfigError(
                f"pruner.sparsity_scale: layers={pattern!r} matches no prunable layer; allowed "
                f"values: patterns over the layer names, e.g. {names[0]!r}, {names[-1]!r}, "
                f"'{names[-1].split('.')[0]}.*'"
            )

    def of(name: str) -> float:
        factor = next((f for p, f in scales.items() if fnmatchcase(name, p)), 1.0)
        return min(MAX_LAYER_SPARSITY, sparsity * factor)

    return of


def per_layer_config_list(
    model: nn.Module,
    sparsity_of: Callable[[str], float],
    round_to: int | None,
    skip: set[str | None],
) -> list[dict[str, Any]]:
    """One entry per prunable layer at its own sparsity; with `round_to`, rounded as
    rounded_config_list says. Layers that keep every channel get no entry."""
    if round_to:
        return rounded_config_list(model, sparsity_of, round_to, skip)
    return [
        {"sparsity_per_layer": sparsity_of(name), "op_names": [name]}
        for name in prunable_layers(model, skip)
        if sparsity_of(name) > 0
    ]


def rounded_config_list(
    model: nn.Module,
    sparsity_of: Callable[[str], float],
    round_to: int,
    skip: set[str | None],
) -> list[dict[str, Any]]:
    """Per-layer sparsities that keep the multiple of `round_to` nearest to (1 - sparsity) * C
    channels (at least `round_to`, at most C), sparsity = sparsity_of(the layer's name).

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
    for name, channels in prunable_layers(model, skip).items():
        multiples = math.floor((1.0 - sparsity_of(name)) * channels / round_to + 0.5)  # nearest
        keep = min(channels, max(round_to, multiples * round_to))
        if keep < channels:
            # NNI prunes int(s * C) channels; +0.5 keeps float error from dropping one more.
            entries.append(
                {"sparsity_per_layer": (channels - keep + 0.5) / channels, "op_names": [name]}
            )
    return entries
