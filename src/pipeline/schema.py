"""Typed schema of the run configuration, registered with Hydra's ConfigStore.

conf/config.yaml names `config_schema` first in its defaults list, so Hydra merges every YAML
file and every command-line override into these dataclasses while it composes: a misspelt key or
a value of the wrong type fails at composition, before any work. Defaults live in the YAML files
(one home for each value), so no field here has one. Range checks that types cannot express are
in pipeline.config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class PruningMode(str, Enum):
    normal = "normal"
    dependency_aware = "dependency_aware"


class Activation(str, Enum):
    relu = "relu"
    relu6 = "relu6"
    gelu = "gelu"
    # Not NNI's: a channel's mean |output|, so that outputs no ReLU follows (MobileNetV2's
    # linear bottlenecks and residual streams) rank by what they carry of either sign.
    abs = "abs"


# The pruner.activation values NNI 2.10.1's activation pruners take themselves; the others are
# the project's (pipeline.nni_adapter.MAGNITUDES).
NNI_ACTIVATIONS = (Activation.relu.value, Activation.relu6.value, Activation.gelu.value)


class Statistics(str, Enum):
    activation = "activation"
    nni = "nni"


class Recalibration(str, Enum):
    """After which pruning steps BatchNorm statistics are re-estimated."""

    last_step = "last_step"  # once, on the final model
    every_step = "every_step"  # after every step, so later steps rank on fitting statistics


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


class DropoutRule(str, Enum):
    """The dropout rates a pruned model fine-tunes with."""

    keep = "keep"  # the model's own
    # Han et al. 2015: each rate times the square root of the share of connections kept in
    # the layer its units feed (pipeline.stages.finetune.scale_dropout).
    scaled = "scaled"


class Runtime(str, Enum):
    eager = "eager"
    jit_freeze = "jit_freeze"
    onnxruntime = "onnxruntime"  # the .[runtimes] extra
    compile = "compile"  # torch.compile


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Objective(str, Enum):
    """What a job returns to a sweeper (pipeline.objectives)."""

    accuracy = "accuracy"  # the pruned model's test accuracy
    constrained_sparsity = "constrained_sparsity"  # sparsity, if the accuracy drop is allowed
    pareto = "pareto"  # the values of search.metrics, in order


class DropEstimate(str, Enum):
    point = "point"  # the measured drop
    upper = "upper"  # the upper end of its 95 % interval: within the limit with 97.5 % confidence


class Metric(str, Enum):
    """A value of the pruned model that a multi-objective search can return."""

    accuracy = "accuracy"
    top5 = "top5"
    params = "params"
    macs = "macs"
    size_bytes = "size_bytes"
    latency_p50_ms = "latency_p50_ms"
    latency_p90_ms = "latency_p90_ms"
    throughput = "throughput"


@dataclass
class LayerScale:
    layers: str = MISSING  # an fnmatch pattern over layer names: classifier.*, features.1?.conv.2
    factor: float = MISSING  # the layers' sparsity is multiplied by it

    @staticmethod
    def as_mapping(scales: list[LayerScale]) -> dict[str, float]:
        return {scale.layers: scale.factor for scale in scales}


@dataclass
class PrunerSettings:
    # The NNI pruner class (ActivationMeanRankPruner, ...); conf/pruner/<name>.yaml sets it.
    _target_: str = MISSING
    mode: PruningMode = MISSING
    activation: Activation = MISSING
    training_steps: int = MISSING
    batch_size: int = MISSING  # of the batches that rank channels and re-estimate BatchNorm
    statistics: Statistics = MISSING
    lr: float = MISSING
    config_list: Any = MISSING
    exclude_last_layer: bool = MISSING
    confidence: int = MISSING
    pruning_on_cuda: bool = MISSING
    round_to: int | None = MISSING
    # Factors on the sparsity of the layers whose names match a pattern. A list, not a mapping:
    # Hydra merges a mapping given on the command line into the (struct) one, and layer names
    # hold dots. Not MISSING: OmegaConf leaves a MISSING list missing when conf/ merges [] in.
    sparsity_scale: list[LayerScale] = field(default_factory=list)
    iterations: int = MISSING
    recalibration_batches: int = MISSING
    recalibrate: Recalibration = MISSING
    trace_input_size: int | None = MISSING


@dataclass
class TrainingSettings:
    """What the one training loop (pipeline.training.fit) needs; baseline, finetune add theirs."""

    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING  # the peak rate
    optimizer: Any = MISSING  # a _partial_ _target_ node, called with (parameters, lr=lr)
    schedule: Schedule = MISSING
    warmup_epochs: int = MISSING
    channels_last: bool = MISSING  # train in NHWC (the layout of weights and batches)


@dataclass
class ConvergenceSettings:
    window: int = MISSING  # the last epochs that must not improve on the earlier ones ...
    tolerance: float = MISSING  # ... by more than this much val accuracy (0.01: one point)


@dataclass
class BaselineSettings(TrainingSettings):
    checkpoint: str | None = MISSING
    cache: bool = MISSING
    convergence: ConvergenceSettings = field(default_factory=ConvergenceSettings)


@dataclass
class DistillSettings:
    alpha: float = MISSING
    temperature: float = MISSING


@dataclass
class FinetuneSettings(TrainingSettings):
    distill: DistillSettings | None = MISSING
    # Epochs after each pruning step but the last, out of `epochs` (pipeline.stages.iterative).
    between_steps: int = MISSING
    dropout: DropoutRule = MISSING
    # Per-step decay of an exponential moving average of the weights, which each epoch then
    # validates and the run keeps (pipeline.training.ema_average); 0: none.
    ema_decay: float = MISSING


@dataclass
class MeasureSettings:
    warmup: int = MISSING
    repeats: int = MISSING
    rounds: int = MISSING
    throughput_batch_size: int = MISSING
    throughput_repeats: int = MISSING
    threads: int | None = MISSING
    onnx: bool = MISSING
    runtime: Runtime = MISSING
    fold_bn: bool = MISSING
    channels_last: bool = MISSING


@dataclass
class TrackingSettings:
    enabled: bool = MISSING
    uri: str | None = MISSING
    experiment: str = MISSING
    sample_interval_s: float = MISSING
    system_metrics: bool = MISSING


@dataclass
class PathSettings:
    output_root: str = MISSING
    cache_dir: str = MISSING


@dataclass
class SearchSettings:
    """What a job returns to a sweeper such as Optuna (conf/sweep/search_*.yaml set these)."""

    objective: Objective = MISSING
    max_accuracy_drop: float = MISSING  # points; constrained_sparsity only
    drop_estimate: DropEstimate = MISSING  # constrained_sparsity only
    metrics: list[Metric] = MISSING  # pareto only; in the order of hydra.sweeper.direction


@dataclass
class BudgetSettings:
    """A cost target instead of a sparsity (pipeline.stages.budget): a ratio of the baseline's."""

    macs: float | None = MISSING
    params: float | None = MISSING
    latency: float | None = MISSING  # measured on the run's device, in measure's inference form
    tolerance: float = MISSING  # MACs and params land in [target - tolerance, target]


@dataclass
class RunSettings:
    # Builders differ in their arguments: free-form `_target_` nodes.
    model: Any = MISSING
    dataset: Any = MISSING
    criterion: Any = MISSING  # the loss every stage trains, ranks and evaluates with
    pruner: PrunerSettings = field(default_factory=PrunerSettings)
    baseline: BaselineSettings = field(default_factory=BaselineSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    seed: int = MISSING
    sparsity: float = MISSING
    device: DeviceChoice = MISSING
    max_batches: int | None = MISSING
    num_workers: int = MISSING
    force: bool = MISSING


def register() -> None:
    """Make `config_schema` known to Hydra; conf/config.yaml names it in its defaults list."""
    ConfigStore.instance().store(name="config_schema", node=RunSettings)
