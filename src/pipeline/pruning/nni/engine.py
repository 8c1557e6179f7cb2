"""NNI 2.10.1 behind the pruning engine interface (pipeline.pruning.engine): its structured
pruners rank and mask (adapter.channel_masks), ModelSpeedup narrows (adapter.speedup)."""

from __future__ import annotations

from torch import nn

from pipeline.config.schema import NNI_ACTIVATIONS, PrunerSettings
from pipeline.data.datasets import StageInputs
from pipeline.errors import ConfigError
from pipeline.pruning.engine import Masks, refuse_unread
from pipeline.pruning.nni.adapter import LayerDependencies, channel_masks, pruner_kind, speedup

# Rankers that count a channel's zero outputs (APoZ): the project's magnitudes (abs) are never
# zero, so under them every channel would tie; only NNI's own activations fit.
COUNTS_ZEROS = ("ActivationAPoZRankPruner",)


# The engine options (schema.engine_option) each kind of NNI pruner reads.
EVERY_PRUNER = ("mode", "config_list", "confidence", "trace_input_size")
READS = {
    "norm": EVERY_PRUNER,
    "gradient": (*EVERY_PRUNER, "training_steps", "lr"),
    "activation": (*EVERY_PRUNER, "training_steps", "lr", "activation", "statistics"),
}


class NniEngine:
    name = "nni"
    narrows_while_ranking = False
    OPTIONS = {
        "mode": "pruner=mean_rank, apoz, l1_norm, l2_norm, fpgm, taylor",
        "config_list": "pruner=mean_rank, apoz, l1_norm, l2_norm, fpgm, taylor",
        "confidence": "pruner=mean_rank, apoz, l1_norm, l2_norm, fpgm, taylor",
        "trace_input_size": "pruner=mean_rank, apoz, l1_norm, l2_norm, fpgm, taylor",
        "training_steps": "pruner=mean_rank, apoz, taylor",
        "lr": "pruner=mean_rank, apoz, taylor",
        "activation": "pruner=mean_rank, apoz",
        "statistics": "pruner=mean_rank, apoz",
    }

    def check(self, settings: PrunerSettings) -> None:
        kind = pruner_kind(settings._target_)
        label = f"NNI's {str(settings._target_).rsplit('.', 1)[-1]}"
        refuse_unread(settings, READS[kind], label)
        for name in READS[kind]:
            if name not in ("config_list", "trace_input_size") and getattr(settings, name) is None:
                raise ConfigError(
                    f"pruner.{name} is missing; {label} reads it: set it in the pruner's file "
                    f"or on the command line"
                )
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
