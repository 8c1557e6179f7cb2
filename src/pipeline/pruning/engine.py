"""The pruning engine interface: all the stages ask of a pruning library.

An engine ranks and masks output channels for a config list, makes the model physically
narrower from the masks, and says which layers are tied (channels that must go together, found
while ranking and handed back to later calls on the same, narrower model). It also checks its
own options, so that one engine's settings never reach another's code. The engine is chosen by
the top-level package of `pruner._target_` (`nni.` today).
"""

from __future__ import annotations

import importlib
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
ENGINES = {"nni": "pipeline.pruning.nni.engine.NniEngine"}


class PruningEngine(Protocol):
    name: str

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
        """Masks of the lowest-ranked output channels (`model` keeps its shapes), ranked on
        batches of inputs.loaders.train, and the tied layers found or reused."""

    def narrow(
        self,
        model: nn.Module,
        masks: Masks,
        input_shape: tuple[int, int, int],
        settings: PrunerSettings,
    ) -> nn.Module:
        """The model with the masked channels removed; EmptyLayerError (pipeline.errors) where
        a layer would keep no channel."""


def engine_name(target: str) -> str:
    """The engine a pruner's `_target_` belongs to; ConfigError when none does."""
    name = str(target).split(".", 1)[0]
    if name not in ENGINES:
        raise ConfigError(
            f"pruner._target_={target!r} is not allowed; allowed values: a pruner class of "
            f"{', '.join(ENGINES)} (e.g. nni.compression.pytorch.pruning.ActivationMeanRankPruner)"
        )
    return name


def engine_for(settings: PrunerSettings) -> PruningEngine:
    module_name, _, class_name = ENGINES[engine_name(settings._target_)].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)()
