"""Typed schema of the run configuration, registered with Hydra's ConfigStore.

conf/config.yaml names `config_schema` first in its defaults list, so Hydra merges every YAML
file and every command-line override into these dataclasses while it composes: a misspelt key or
a value of the wrong type fails at composition, before any work. Defaults live in the YAML files
(one home for each value), so no field here has one, except the neutral value of an option that
changes nothing when left out. A field's range, where its type cannot express it, is declared
with the field (`ranged`) and checked by pipeline.checks.settings.settings_from: a new option is
its field here and the code that reads it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from pipeline.errors import ConfigError


def ranged(check: Callable[[Any], bool], allowed: str, default: Any = MISSING) -> Any:
    """A field whose value must pass `check`; `allowed` says which values do, in the one-line
    error a value that does not pass gets. A `default` is the option's neutral value, the one
    that changes nothing: left at it, the option is not part of a run's identity
    (pipeline.config.identity), so adding an option keeps earlier runs and caches valid."""
    metadata = {"check": check, "allowed": allowed}
    if default is not MISSING:
        metadata["neutral"] = default
    return field(default=default, metadata=metadata)


def settings_fields(node: type) -> Iterator[tuple[dataclasses.Field, type | None]]:
    """Each field of the settings class `node`, with the settings class its value holds
    (directly, optionally or as list items), or None: how the range checks and the identity
    walk the schema."""
    hints = typing.get_type_hints(node)
    for item in dataclasses.fields(node):
        inner = (hints[item.name], *typing.get_args(hints[item.name]))
        yield item, next((t for t in inner if dataclasses.is_dataclass(t)), None)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
# the project's (pipeline.pruning.nni.adapter.MAGNITUDES).
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
    cudagraphs = "cudagraphs"  # torch.compile(mode="reduce-overhead"): CUDA graphs; CUDA only
    tensorrt = "tensorrt"  # Torch-TensorRT, the .[tensorrt] extra; CUDA only


class InferencePrecision(str, Enum):
    """The number format both models are evaluated and timed in (measure.precision)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Objective(str, Enum):
    """What a job returns to a sweeper (pipeline.sweeps.objectives)."""

    accuracy = "accuracy"  # the pruned model's test accuracy
    constrained_sparsity = "constrained_sparsity"  # sparsity, if the accuracy drop is allowed
    pareto = "pareto"  # the values of search.metrics, in order


class Registration(str, Enum):
    """Which runs tracking.register_as registers (pipeline.tracking.logged_model)."""

    each = "each"  # every run adds a version
    best = "best"  # a sweep registers its best job only (by its objective), alias `champion`


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


def engine_option(check: Callable[[Any], bool], allowed: str, neutral: bool = False) -> Any:
    """An option that only some pruners read: None where the pruner's file leaves it out, and
    refused (pipeline.pruning.engine.refuse_unread) where it is given to a pruner that does not
    read it. `neutral`: None is left out of a run's identity (options new to the schema)."""
    metadata = {"check": lambda v: v is None or check(v), "allowed": allowed, "optional": True}
    if neutral:
        metadata["neutral"] = None
    return field(default=None, metadata=metadata)


def _always(value: Any) -> bool:
    return True


@dataclass
class PrunerSettings:
    """One pruner's settings. conf/pruner/<name>.yaml sets `_target_` (the engine follows from
    its top-level package: an NNI pruner class, or a Torch-Pruning importance class) and the
    options that pruner reads; the others stay None."""

    _target_: str = MISSING
    # Read by every engine (pipeline.stages.prune, pipeline.pruning.steps).
    batch_size: int = ranged(lambda v: v >= 1, "an integer >= 1")  # ranking and BN batches
    exclude_last_layer: bool = MISSING
    pruning_on_cuda: bool = MISSING
    round_to: int | None = ranged(lambda v: v is None or v >= 1, "null or an integer >= 1")
    # Factors on the sparsity of the layers whose names match a pattern. A list, not a mapping:
    # Hydra merges a mapping given on the command line into the (struct) one, and layer names
    # hold dots. Not MISSING: OmegaConf leaves a MISSING list missing when conf/ merges [] in.
    sparsity_scale: list[LayerScale] = field(default_factory=list)
    iterations: int = ranged(lambda v: v >= 1, "an integer >= 1")
    recalibration_batches: int = ranged(lambda v: v >= 0, "an integer >= 0")
    recalibrate: Recalibration = MISSING
    # Read by the pruners that rank on data (activations, gradients): training batches.
    training_steps: int | None = engine_option(lambda v: v >= 1, "an integer >= 1")
    # NNI's (pipeline.pruning.nni): identity keeps them, as runs before the second engine did.
    mode: PruningMode | None = engine_option(_always, "normal or dependency_aware")
    activation: Activation | None = engine_option(_always, "relu, relu6, gelu or abs")
    statistics: Statistics | None = engine_option(_always, "activation or nni")
    lr: float | None = engine_option(lambda v: v > 0, "a number > 0")
    config_list: Any = engine_option(
        lambda v: OmegaConf.is_list(v),
        "null or a list of NNI config dicts like [{sparsity_per_layer: 0.2, op_types: [Conv2d]}]",
    )
    confidence: int | None = engine_option(lambda v: v > 1, "an integer > 1")
    trace_input_size: int | None = engine_option(lambda v: v >= 8, "null or an integer >= 8")
    # Torch-Pruning's (pipeline.pruning.tp).
    # Keyword arguments of the importance class `_target_` (GroupMagnitudeImportance: p=2).
    importance: dict[str, Any] | None = engine_option(
        _always, "a mapping of the importance class's arguments, e.g. {p: 2}", neutral=True
    )
    # Rank the channels of all layers together (Torch-Pruning's global pruning), so that the
    # engine allocates the sparsity across layers; false: every layer loses `sparsity`.
    global_pruning: bool | None = engine_option(_always, "true or false", neutral=True)
    # Global ranking only among groups of the same structure (ECCV 2024), needs global_pruning.
    isomorphic: bool | None = engine_option(_always, "true or false", neutral=True)
    # fnmatch patterns of layers never pruned; the output layer always is (exclude_last_layer).
    ignored_layers: list[str] | None = engine_option(
        _always, "a list of layer-name patterns such as ['encoder.layers.0.*']", neutral=True
    )
    # fnmatch patterns of submodules pruned each as a graph of its own, keeping the width of
    # what leaves them (their last layer's outputs): only the widths free inside them, such as
    # a transformer block's MLP hidden width or a ShuffleNet branch's inner width, for models
    # whose whole graph the engine cannot trace. []: the whole model as one graph.
    submodules: list[str] | None = engine_option(
        _always, "a list of submodule-name patterns such as ['*.mlp']", neutral=True
    )
    # Remove whole attention heads of nn.MultiheadAttention (at the step's sparsity) instead of
    # narrowing every head.
    prune_heads: bool | None = engine_option(_always, "true or false", neutral=True)


@dataclass
class TrainingSettings:
    """What the one training loop (pipeline.training.loop.fit) needs; baseline, finetune add
    theirs."""

    epochs: int = ranged(lambda v: v >= 0, "an integer >= 0")
    batch_size: int = ranged(lambda v: v >= 1, "an integer >= 1")
    lr: float = MISSING  # the peak rate
    optimizer: Any = MISSING  # a _partial_ _target_ node, called with (parameters, lr=lr)
    schedule: Schedule = MISSING
    warmup_epochs: int = ranged(lambda v: v >= 0, "an integer >= 0")
    channels_last: bool = MISSING  # train in NHWC (the layout of weights and batches)
    # Clip the gradients' global L2 norm to this before each optimizer step (torch's
    # clip_grad_norm_): steadies the first steps on a freshly pruned model at a high rate.
    # null: no clipping (what a run did before the option existed).
    max_grad_norm: float | None = ranged(
        lambda v: v is None or v > 0, "null (no clipping) or a number > 0", default=None
    )


@dataclass
class ConvergenceSettings:
    # the last epochs that must not improve on the earlier ones ...
    window: int = ranged(lambda v: v >= 1, "an integer >= 1")
    # ... by more than this much val accuracy (0.01: one point)
    tolerance: float = ranged(lambda v: v >= 0, "a number >= 0")


@dataclass
class BaselineSettings(TrainingSettings):
    checkpoint: str | None = MISSING
    cache: bool = MISSING
    convergence: ConvergenceSettings = field(default_factory=ConvergenceSettings)


@dataclass
class DistillSettings:
    alpha: float = ranged(lambda v: v is None or 0 <= v <= 1, "a number in [0, 1]")
    temperature: float = ranged(lambda v: v is None or v > 0, "a number > 0")


@dataclass
class FinetuneSettings(TrainingSettings):
    distill: DistillSettings | None = MISSING
    # Epochs after each pruning step but the last, out of `epochs` (pipeline.pruning.steps).
    between_steps: int = ranged(lambda v: v >= 0, "an integer >= 0")
    dropout: DropoutRule = MISSING
    # Per-step decay of an exponential moving average of the weights, which each epoch then
    # validates and the run keeps (pipeline.training.loop.ema_average); 0: none.
    ema_decay: float = ranged(lambda v: 0 <= v < 1, "a number in [0, 1) (0: no averaging)")


def _batch_sizes(value: Any) -> bool:
    return value is None or (
        len(value) > 0
        and all(is_number(b) and int(b) == b and b >= 1 for b in value)
        and len(set(value)) == len(value)
    )


@dataclass
class MeasureSettings:
    warmup: int = ranged(lambda v: v >= 0, "an integer >= 0")
    repeats: int = ranged(lambda v: v >= 1, "an integer >= 1")
    rounds: int = ranged(lambda v: v >= 1, "an integer >= 1")
    throughput_batch_size: int = MISSING
    throughput_repeats: int = MISSING
    threads: int | None = MISSING
    onnx: bool = MISSING
    runtime: Runtime = MISSING
    fold_bn: bool = MISSING
    channels_last: bool = MISSING
    # fp32 | bf16 | fp16: weights and inputs cast for accuracy and timing, both models alike
    precision: InferencePrecision = ranged(
        lambda v: True, "fp32, bf16, fp16", InferencePrecision.fp32
    )
    # The batch sizes both models are timed at, each in its own alternating rounds; null: the
    # device's default (pipeline.stages.measure.DEFAULT_BATCH_SIZES)
    batch_sizes: list[int] | None = ranged(
        _batch_sizes,
        "null (the device's default: [1] on the CPU, [1, 8, 64] on CUDA) or a list of distinct "
        "integers >= 1, e.g. [1, 8, 64]",
        None,
    )


@dataclass
class TrackingSettings:
    enabled: bool = MISSING
    uri: str | None = MISSING
    experiment: str = MISSING
    sample_interval_s: float = MISSING
    system_metrics: bool = MISSING
    # The pruned network as an MLflow model (a pickle-free pyfunc, and ONNX with measure.onnx)
    log_model: bool = MISSING
    log_baseline_model: bool = MISSING  # the unpruned network too
    # A registered model name each run (or, with register=best, a sweep's best job) adds a
    # version to; null: none. Characters that models:/NAME@alias URIs would misread are refused.
    register_as: str | None = ranged(
        lambda v: v is None or (bool(v) and not set(v) & set("/:@#?%")),
        "null or a name without / : @ # ? %",
    )
    register: Registration = MISSING


class Strategy(str, Enum):
    single = "single"  # one process, one device
    ddp = "ddp"  # torch.distributed data-parallel, one process per device (started by torchrun)


PRECISIONS = ("auto", "bf16-mixed", "16-mixed", "32")


@dataclass
class TrainerSettings:
    """How the baseline and the fine-tuning train (pipeline.training.distributed): on one device
    or data-parallel over several, and in which precision. Pruning and measuring run on one
    process either way."""

    strategy: Strategy = ranged(lambda v: True, "single, ddp", Strategy.single)
    # processes per node (one per GPU; on the CPU, gloo processes); must match torchrun's
    devices: int = ranged(lambda v: is_number(v) and v >= 1, "an integer >= 1", 1)
    num_nodes: int = ranged(lambda v: is_number(v) and v >= 1, "an integer >= 1", 1)
    # auto: bf16-mixed on a CUDA GPU that supports bf16, else 32 (the CPU: bf16 was slower)
    precision: str = ranged(lambda v: v in PRECISIONS, ", ".join(PRECISIONS), "auto")
    # auto: nccl on CUDA, gloo on the CPU
    backend: str = ranged(lambda v: v in ("auto", "gloo", "nccl"), "auto, gloo, nccl", "auto")
    # how long a rank waits for the others (a collective, a barrier) before the job fails
    timeout_s: float = ranged(lambda v: is_number(v) and v > 0, "a number > 0", 1800.0)


@dataclass
class PathSettings:
    output_root: str = MISSING
    cache_dir: str = MISSING


@dataclass
class SearchSettings:
    """What a job returns to a sweeper such as Optuna (conf/sweep/search_*.yaml set these)."""

    objective: Objective = MISSING
    # points; constrained_sparsity only
    max_accuracy_drop: float = ranged(lambda v: v >= 0, "a number >= 0")
    drop_estimate: DropEstimate = MISSING  # constrained_sparsity only
    # pareto only; in the order of hydra.sweeper.direction
    metrics: list[Metric] = ranged(
        lambda v: len(v) >= 1, "a non-empty list such as [accuracy, macs]"
    )


BUDGET_FALLBACKS = ("below", "nearest")


@dataclass
class BudgetSettings:
    """A cost target instead of a sparsity (pipeline.pruning.budget): a ratio of the baseline's."""

    macs: float | None = ranged(lambda v: v is None or 0 < v < 1, "null or a ratio in (0, 1)")
    params: float | None = ranged(lambda v: v is None or 0 < v < 1, "null or a ratio in (0, 1)")
    # measured on the run's device, in measure's inference form
    latency: float | None = ranged(lambda v: v is None or 0 < v < 1, "null or a ratio in (0, 1)")
    # MACs and params land in [target - tolerance, target]
    tolerance: float = ranged(lambda v: 0 < v < 0.5, "a number in (0, 0.5)")
    # Where whole-channel steps jump over that window, MACs and params take the model below it
    # (the target is a ceiling), or the one nearest the target within the tolerance on either
    # side (recipes compared at one size). A latency ratio stays at most its target.
    fallback: str = ranged(lambda v: v in BUDGET_FALLBACKS, "below, nearest", "below")


BUDGET_KINDS = ("macs", "params", "latency")


def budget_overrides(given: dict[str, str]) -> list[str]:
    """The `budget.KIND=VALUE` entries of a command line's overrides (key -> value) that ask for
    a budget (a value other than null)."""
    return [
        f"{key}={value}"
        for key, value in given.items()
        if key.removeprefix("budget.") in BUDGET_KINDS and value not in ("null", "")
    ]


def asked_budget(budget: BudgetSettings | Any) -> tuple[str, float] | None:
    """The cost target the settings ask for, (kind, ratio), or None; two at once are refused."""
    given = [(kind, getattr(budget, kind)) for kind in BUDGET_KINDS if getattr(budget, kind)]
    if len(given) > 1:
        keys = " and ".join(f"budget.{kind}={value}" for kind, value in given)
        raise ConfigError(
            f"{keys}: one budget at a time; allowed: one of budget.{{{','.join(BUDGET_KINDS)}}}"
        )
    return given[0] if given else None


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
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    seed: int = MISSING
    sparsity: float = ranged(lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)")
    device: DeviceChoice = MISSING
    max_batches: int | None = ranged(lambda v: v is None or v >= 1, "null or an integer >= 1")
    num_workers: int = MISSING
    force: bool = MISSING


def register() -> None:
    """Make `config_schema` known to Hydra; conf/config.yaml names it in its defaults list."""
    ConfigStore.instance().store(name="config_schema", node=RunSettings)


def plain(settings: RunSettings) -> dict:
    """RunSettings as plain JSON-ready data (enums as their names), for records and params."""
    return OmegaConf.to_container(OmegaConf.structured(settings), enum_to_str=True)
