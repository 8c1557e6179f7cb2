"""NNI 2.10.1 behind the pruning engine interface (pipeline.pruning.engine): its activation
pruners rank and mask (adapter.channel_masks), ModelSpeedup narrows (adapter.speedup)."""

from __future__ import annotations

from torch import nn

from pipeline.config.schema import NNI_ACTIVATIONS, PrunerSettings
from pipeline.data.datasets import StageInputs
from pipeline.errors import ConfigError
from pipeline.pruning.engine import Masks
from pipeline.pruning.nni.adapter import LayerDependencies, channel_masks, speedup

# Rankers that count a channel's zero outputs (APoZ): the project's magnitudes (abs) are never
# zero, so under them every channel would tie; only NNI's own activations fit.
COUNTS_ZEROS = ("ActivationAPoZRankPruner",)


class NniEngine:
    name = "nni"

    def check(self, settings: PrunerSettings) -> None:
        value = getattr(settings.activation, "value", settings.activation)
        if (
            str(settings._target_).rsplit(".", 1)[-1] in COUNTS_ZEROS
            and value not in NNI_ACTIVATIONS
        ):
            raise ConfigError(
                f"pruner.activation={value!r} is not allowed with pruner=apoz (it ranks channels "
                f"by their share of zero outputs, and a magnitude is never zero); allowed values: "
                f"{', '.join(NNI_ACTIVATIONS)}"
            )

    def channel_masks(
        self,
        model: nn.Module,
        config_list: list[dict],
        settings: PrunerSettings,
        inputs: StageInputs,
        tied: LayerDependencies | None = None,
    ) -> tuple[Masks, LayerDependencies | None]:
        loader, criterion = inputs.loaders.train, inputs.criterion
        return channel_masks(
            model, config_list, settings, loader, criterion, inputs.device, inputs.input_shape, tied
        )

    def narrow(
        self,
        model: nn.Module,
        masks: Masks,
        input_shape: tuple[int, int, int],
        settings: PrunerSettings,
    ) -> nn.Module:
        return speedup(model, masks, input_shape, settings.confidence, settings.trace_input_size)
