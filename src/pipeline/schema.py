"""Typed schema of the run configuration, checked before any work starts.

The YAML files under conf/ stay free-form so that Hydra composes them without surprises; this
module merges the composed config into typed dataclasses and adds the range checks that types
cannot express. Every failure becomes one ``ConfigError`` line naming the key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError


class PrunerType(str, Enum):
    apoz = "apoz"
    mean_rank = "mean_rank"


class PruningMode(str, Enum):
    normal = "normal"
    dependency_aware = "dependency_aware"


class Activation(str, Enum):
    relu = "relu"
    relu6 = "relu6"
    gelu = "gelu"


class Runtime(str, Enum):
    eager = "eager"
    jit_freeze = "jit_freeze"


class Statistics(str, Enum):
    activation = "activation"
    nni = "nni"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class PrunerSchema:
    type: PrunerType
    mode: PruningMode
    activation: Activation
    training_steps: int
    lr: float
    config_list: Any
    exclude_last_layer: bool
    confidence: int
    pruning_on_cuda: bool
    round_to: int | None
    trace_input_size: int | None
    statistics: Statistics
    iterations: int
    recalibration_batches: int


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


@dataclass
class DistillSchema:
    alpha: float
    temperature: float


@dataclass
class FinetuneSchema:
    epochs: int
    batch_size: int
    lr: float
    criterion: Any
    optimizer: Any
    schedule: Schedule
    warmup_epochs: int
    distill: DistillSchema | None


@dataclass
class BaselineSchema:
    checkpoint: str | None
    epochs: int
    lr: float
    batch_size: int
    cache: bool
    optimizer: Any


@dataclass
class MeasureSchema:
    warmup: int
    repeats: int
    throughput_batch_size: int
    throughput_repeats: int
    threads: int | None
    onnx: bool
    runtime: Runtime
    fold_bn: bool
    channels_last: bool


@dataclass
class RunSchema:
    model: Any
    dataset: Any
    pruner: PrunerSchema
    finetune: FinetuneSchema
    baseline: BaselineSchema
    measure: MeasureSchema
    seed: int
    sparsity: float
    device: DeviceChoice
    max_batches: int | None
    num_workers: int
    paths: Any


_ALLOWED = {
    "pruner.type": PrunerType,
    "pruner.mode": PruningMode,
    "pruner.activation": Activation,
    "device": DeviceChoice,
    "measure.runtime": Runtime,
    "finetune.schedule": Schedule,
    "pruner.statistics": Statistics,
}


def _one_line(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or "?"
    value = getattr(error, "value", None)
    if key in _ALLOWED:
        allowed = ", ".join(member.value for member in _ALLOWED[key])
        return f"{key}={value!r} is not allowed; allowed values: {allowed}"
    message = str(error).splitlines()[0]
    return f"{key}: {message}"


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError with one line naming the key if any setting is invalid."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    # Sections outside the schema (tracking, ...) are checked by the modules that own them.
    known = set(RunSchema.__dataclass_fields__)
    typed_part = {key: value for key, value in plain.items() if key in known}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RunSchema), typed_part)
        OmegaConf.resolve(typed)
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None

    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    checks = [
        ("sparsity", lambda v: number(v) and 0 < v < 1, "a number in (0, 1)"),
        ("pruner.confidence", lambda v: v > 1, "an integer > 1"),
        ("pruner.training_steps", lambda v: v >= 1, "an integer >= 1"),
        ("pruner.iterations", lambda v: v >= 1, "an integer >= 1"),
        ("pruner.recalibration_batches", lambda v: v >= 0, "an integer >= 0"),
        ("pruner.round_to", lambda v: v is None or v >= 1, "null or an integer >= 1"),
        ("pruner.trace_input_size", lambda v: v is None or v >= 8, "null or an integer >= 8"),
        ("finetune.batch_size", lambda v: v >= 1, "an integer >= 1"),
        ("baseline.batch_size", lambda v: v >= 1, "an integer >= 1"),
        ("measure.repeats", lambda v: v >= 1, "an integer >= 1"),
        ("finetune.epochs", lambda v: v >= 0, "an integer >= 0"),
        ("finetune.warmup_epochs", lambda v: v >= 0, "an integer >= 0"),
        ("finetune.distill.alpha", lambda v: v is None or 0 <= v <= 1, "a number in [0, 1]"),
        ("finetune.distill.temperature", lambda v: v is None or v > 0, "a number > 0"),
        ("baseline.epochs", lambda v: v >= 0, "an integer >= 0"),
        ("measure.warmup", lambda v: v >= 0, "an integer >= 0"),
        ("dataset.val_fraction", lambda v: v is None or 0 <= v < 1, "a number in [0, 1)"),
        ("dataset.test_fraction", lambda v: v is None or 0 < v < 1, "a number in (0, 1)"),
        ("pruner.config_list", lambda v: v is None or OmegaConf.is_list(v), _CONFIG_LIST_HINT),
    ]
    for key, is_allowed, allowed in checks:
        value = OmegaConf.select(cfg, key)
        if not is_allowed(value):
            shown = value if isinstance(value, (int, float, str)) else "<given value>"
            raise ConfigError(f"{key}={shown!r} is not allowed; allowed values: {allowed}")


_CONFIG_LIST_HINT = (
    "null or a list of NNI config dicts such as [{sparsity_per_layer: 0.2, op_types: [Conv2d]}]"
)
