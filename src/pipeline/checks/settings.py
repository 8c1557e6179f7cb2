"""The checks a composed config passes before any work: value ranges, the `_target_`s it builds
from and their arguments, NNI config lists, the pruner's activation, one budget at a time.
settings_from turns a config that passes into typed RunSettings; every failure is one
ConfigError line naming the key and the allowed values.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config.compose import causes, one_line
from pipeline.config.schema import (
    Objective,
    Registration,
    RunSettings,
    asked_budget,
    is_number,
    settings_fields,
)
from pipeline.errors import ConfigError
from pipeline.pruning.config_list import SPARSITY_KEYS
from pipeline.pruning.engine import engine_for

# Ranges of what the schema cannot declare with its fields: free-form `_target_` nodes, and a
# field whose check reads its items.
FREE_FORM_RANGES = [
    ("dataset.val_fraction", lambda v: v is None or 0 <= v < 1, "a number in [0, 1)"),
    ("dataset.test_fraction", lambda v: v is None or 0 < v < 1, "a number in (0, 1)"),
    (
        "pruner.sparsity_scale",
        lambda v: all(is_number(s.factor) and s.factor >= 0 for s in v),
        "a list of {layers: <fnmatch pattern>, factor: <number >= 0>}, e.g. "
        "[{layers: 'classifier.*', factor: 1.5}]",
    ),
]


def schema_ranges(node: type = RunSettings, prefix: str = "") -> Iterator[tuple]:
    """(key, check, allowed) of every field the schema declares with `ranged`, depth first."""
    for item, inner in settings_fields(node):
        key = f"{prefix}{item.name}"
        if "check" in item.metadata:
            yield key, item.metadata["check"], item.metadata["allowed"]
        if inner is not None:
            yield from schema_ranges(inner, f"{key}.")


RANGES = [*schema_ranges(), *FREE_FORM_RANGES]


def settings_from(cfg: DictConfig) -> RunSettings:
    """Check the ranges of a composed config and return it as typed RunSettings."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        typed = OmegaConf.merge(OmegaConf.structured(RunSettings), _without_hydra(resolved))
    except OmegaConfBaseException as error:
        raise ConfigError(_failed_resolution(error)) from None
    for key, is_allowed, allowed in RANGES:
        value = OmegaConf.select(typed, key)
        if not is_allowed(value):
            shown = value if isinstance(value, (int, float, str)) else "<given value>"
            raise ConfigError(f"{key}={shown!r} is not allowed; allowed values: {allowed}")
    check_config_list(OmegaConf.to_container(typed.pruner).get("config_list"))
    check_registration(typed.tracking, typed.search)
    check_inference_precision(typed.measure)
    engine_for(typed.pruner).check(typed.pruner)
    asked_budget(typed.budget)
    for key in TARGETS:
        found = check_target(key, OmegaConf.select(typed, key))
        node = key.rpartition(".")[0]
        if node not in BUILT_BY_ENGINE:
            check_arguments(node, found, OmegaConf.to_container(OmegaConf.select(typed, node)))
    return OmegaConf.to_object(typed)


def _failed_resolution(error: OmegaConfBaseException) -> str:
    """The line for a config that cannot be resolved: a ConfigError raised by a resolver (the
    imagefolder root) keeps its own line."""
    for cause in causes(error):
        if isinstance(cause, ConfigError):
            return str(cause)
    return one_line(error) if error.full_key else str(error)


# Every `_target_` a run builds something from; checked before any work, so that a typo in the
# fine-tuning optimizer does not surface after the baseline has trained. Cheapest imports first
# (torch is loaded already; NNI takes seconds), so that most typos are reported at once.
TARGETS = (
    "criterion._target_",
    "baseline.optimizer._target_",
    "finetune.optimizer._target_",
    "model._target_",
    "dataset._target_",
    "pruner._target_",
)

# The pruner's settings are read by its pruning engine, not passed to its class as they are.
BUILT_BY_ENGINE = ("pruner",)


def check_registration(tracking: Any, search: Any) -> None:
    """tracking.register=best ranks a sweep's jobs by its one objective, under a name."""
    if tracking.register != Registration.best:
        return
    if tracking.register_as is None:
        raise ConfigError(
            "tracking.register=best registers the best job under tracking.register_as, which is "
            "null; allowed values: tracking.register_as=NAME with it, or tracking.register=each"
        )
    if search.objective == Objective.pareto:
        raise ConfigError(
            "tracking.register=best needs one objective to rank jobs by, and "
            "search.objective=pareto gives several; allowed values: search.objective=accuracy|"
            "constrained_sparsity with it, or tracking.register=each"
        )


def check_inference_precision(measure: Any) -> None:
    """measure.precision is one the runtime runs (onnxruntime's export is fp32)."""
    from pipeline.measure.runtime_forms import check_precision

    try:
        check_precision(measure.runtime.value, measure.precision.value)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_target(key: str, path: Any) -> Any:
    """The class or function `path` names (module path, then attributes); ConfigError when it
    cannot be imported or called."""
    parts = str(path).split(".")
    found, reason = None, f"{path!r} names no module"
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            found = importlib.import_module(module_name)
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute, None)
            if found is None:
                reason = f"{module_name} has no {'.'.join(parts[split:])}"
                break
        break
    if found is None or not callable(found):
        raise ConfigError(
            f"{key}={path!r} is not allowed; allowed values: an importable class or function "
            f"({reason})"
        )
    return found


def check_arguments(node: str, target: Any, settings: dict) -> None:
    """The keyword arguments a config node gives its `_target_` are ones it takes (a partial
    target may leave some out: the run supplies them)."""

    arguments = {k: v for k, v in settings.items() if not (k.startswith("_") and k.endswith("_"))}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check against
    try:
        signature.bind_partial(**arguments)
    except TypeError:
        takes = [
            name
            for name, parameter in signature.parameters.items()
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        ]
        unknown = next((name for name in arguments if name not in takes), None)
        if unknown is None:
            return  # positional-only parameters: cannot be named, nothing more to say
        raise ConfigError(
            f"{node}.{unknown} is not an argument of {settings['_target_']}; allowed keys: "
            f"{', '.join(takes)}"
        ) from None


# NNI 2.x config-list keys: what an entry may hold besides one sparsity key.
ENTRY_KEYS = {*SPARSITY_KEYS, "max_sparsity_per_layer", "op_types", "op_names", "op_partial_names"}


def check_config_list(config_list: Any) -> None:
    """A user's NNI config list: dicts with exactly one sparsity key in (0, 1) (or exclude: true),
    op types that are torch.nn layer classes, and no unknown keys."""
    if config_list is None:
        return
    import torch.nn

    for index, entry in enumerate(config_list):
        key = f"pruner.config_list[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}={entry!r} is not allowed; allowed values: a dict")
        unknown = set(entry) - ENTRY_KEYS - {"exclude"}
        if unknown:
            allowed = ", ".join(sorted(ENTRY_KEYS | {"exclude"}))
            raise ConfigError(f"{key}.{sorted(unknown)[0]} is not a key; allowed keys: {allowed}")
        for op_type in entry.get("op_types") or []:
            if not isinstance(getattr(torch.nn, str(op_type), None), type):
                raise ConfigError(
                    f"{key}.op_types={op_type!r} is not allowed; allowed values: torch.nn layer "
                    f"class names such as Conv2d, Linear"
                )
        if entry.get("exclude"):
            continue
        given = [name for name in SPARSITY_KEYS if name in entry]
        if len(given) != 1:
            raise ConfigError(
                f"{key}={entry!r} is not allowed; allowed values: exactly one of "
                f"{', '.join(SPARSITY_KEYS)} (or exclude: true)"
            )
        value = entry[given[0]]
        if not (is_number(value) and 0 < value < 1):
            raise ConfigError(
                f"{key}.{given[0]}={value!r} is not allowed; allowed values: a number in (0, 1)"
            )


def _without_hydra(tree: dict) -> dict:
    return {key: value for key, value in tree.items() if key != "hydra"}
