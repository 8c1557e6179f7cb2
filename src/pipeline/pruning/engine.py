"""The pruning engine interface: all the stages ask of a pruning library.

An engine ranks and masks output channels for a config list, makes the model physically
narrower from the masks, and says which layers are tied (channels that must go together, found
while ranking and handed back to later calls on the same, narrower model). It also checks its
own options, so that one engine's settings never reach another's code. The engine is chosen by
the top-level package of `pruner._target_`: `nni.` (NNI 2.10.1's pruner classes) or
`torch_pruning.` (Torch-Pruning's importance classes, which narrow while they prune).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Collection
from typing import Any, Protocol

import torch
from torch import nn

from pipeline.config.schema import PrunerSettings
from pipeline.data.datasets import StageInputs
from pipeline.errors import ConfigError

Masks = dict[str, dict[str, torch.Tensor]]
# Whatever an engine found about tied layers; only the engine that made it reads it.
TiedLayers = Any

# Engine name (the top-level package of pruner._target_) -> the class that implements it.
ENGINES = {
    "nni": "pipeline.pruning.nni.engine.NniEngine",
    "torch_pruning": "pipeline.pruning.tp.engine.TorchPruningEngine",
}


class PruningEngine(Protocol):
    name: str
    # The pruner options (PrunerSettings' engine options) that some pruner of this engine reads,
    # with the pruners that read each: what a refusal names as the option's home.
    OPTIONS: dict[str, str]
    # True where channel_masks already removes the channels (narrow then has nothing to do).
    narrows_while_ranking: bool

    def check(self, settings: PrunerSettings) -> None:
        """Raise ConfigError (one line) for options this engine cannot honour."""

    def channel_masks(
        self,
        model: nn.Module,
        config_list: list[dict],
        settings: PrunerSettings,
        inputs: StageInputs,
        tied: TiedLayers | None = None,
    ) -> tuple[Masks, TiedLayers | None]:
        """Masks of the lowest-ranked output channels, ranked on batches of
        inputs.loaders.train, and the tied layers found or reused. `model` keeps its shapes,
        unless the engine narrows_while_ranking: then it is narrowed in place."""

    def narrow(
        self,
        model: nn.Module,
        masks: Masks,
        input_shape: tuple[int, int, int],
        settings: PrunerSettings,
    ) -> nn.Module:
        """The model with the masked channels removed; EmptyLayerError (pipeline.errors) where
        a layer would keep no channel. An engine that narrows_while_ranking returns `model`."""


def engine_name(target: str) -> str:
    """The engine a pruner's `_target_` belongs to; ConfigError when none does."""
    name = str(target).split(".", 1)[0]
    if name not in ENGINES:
        raise ConfigError(
            f"pruner._target_={target!r} is not allowed; allowed values: a pruner class of "
            f"{', '.join(ENGINES)} (e.g. nni.compression.pytorch.pruning.ActivationMeanRankPruner)"
        )
    return name


def engine_class(name: str) -> type:
    module_name, _, class_name = ENGINES[name].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def engine_for(settings: PrunerSettings) -> PruningEngine:
    return engine_class(engine_name(settings._target_))()


def optional_options() -> list[str]:
    """The PrunerSettings options that only some pruners read (schema.engine_option)."""
    return [f.name for f in dataclasses.fields(PrunerSettings) if f.metadata.get("optional")]


def refuse_unread(settings: PrunerSettings, reads: Collection[str], pruner: str) -> None:
    """ConfigError (one line) for an option given to a pruner that does not read it: one
    engine's setting would otherwise be silently ignored by the other."""
    for name in optional_options():
        value = getattr(settings, name)
        if name in reads or value is None:
            continue
        shown = getattr(value, "value", value)
        homes = [
            f"{other}: {engine_class(other).OPTIONS[name]}"
            for other in ENGINES
            if name in engine_class(other).OPTIONS
        ]
        raise ConfigError(
            f"pruner.{name}={shown!r} is not allowed with {pruner}, which does not read it; "
            f"allowed: leave it out (its options: {', '.join(sorted(reads)) or 'none'}), or a "
            f"pruner that reads it ({'; '.join(homes) or 'none'})"
        )
