"""The one way a configuration is made: Hydra composes conf/ (shipped inside the package as
`pipeline.conf`) onto the typed schema, then range checks turn it into RunSettings.

Every failure becomes one ConfigError line naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from enum import Enum
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from pipeline import schema
from pipeline.config_list import SPARSITY_KEYS
from pipeline.data_layout import class_count
from pipeline.errors import ConfigError
from pipeline.preflight import check_tracking_server
from pipeline.schema import NNI_ACTIVATIONS, RunSettings

CONFIG_MODULE = "pipeline.conf"  # conf/ at the top of the repository, packaged under this name
CONFIG_NAME = "config"
SEARCH_PATH = f"pkg://{CONFIG_MODULE}"

schema.register()
# imagefolder's num_classes: ${class_count:${.root}}, the class folders under its root.
OmegaConf.register_new_resolver("class_count", class_count, replace=True)


def compose(overrides: list[str] | tuple[str, ...] = (), with_hydra: bool = False) -> DictConfig:
    """The composed config for `overrides`, as `python -m pipeline` would build it (with Hydra's
    own node when `with_hydra`); one ConfigError line when a key, a type or a group choice is
    wrong."""
    overrides = list(overrides)
    GlobalHydra.instance().clear()  # compose() inside a @hydra.main app or after another one
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return hydra_compose(
                config_name=CONFIG_NAME, overrides=overrides, return_hydra_config=with_hydra
            )
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        failure = error
    GlobalHydra.instance().clear()
    raise ConfigError(composition_error(failure, overrides))


def group_choices(group: str) -> list[str]:
    """The choices of a config group (files starting with "_" are shared fragments)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options(group)
    GlobalHydra.instance().clear()
    return sorted(option for option in options if not option.startswith("_"))


def composition_error(error: BaseException, overrides: list[str]) -> str:
    """One line for a failed composition: an unknown group choice, key or value."""
    for cause in _causes(error):
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            return _one_line(cause)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        named = f"'{key}/{value}'" in message or f"{key}={value}" in message
        if named and ("not found" in message or "Could not find" in message):
            allowed = ", ".join(group_choices(key))
            return f"{key}={value!r} is not allowed; allowed values: {allowed}"
    return message


def _causes(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _one_line(error: OmegaConfBaseException) -> str:
    key = error.full_key
    if "Missing mandatory value: " in str(error):
        # Also reached through an interpolation (model.num_classes: ${dataset.num_classes}):
        # the message names the key that has no value.
        missing = str(error).split("Missing mandatory value: ")[-1].split()[0]
        return f"{missing} is required and has no value; set it, e.g. {missing}=..."
    if isinstance(error, MissingMandatoryValue):
        return f"{key} is required and has no value; set it, e.g. {key}=..."
    value = getattr(error, "value", None)
    kind = field_type(key)
    if "not in" in str(error) and "Key" in str(error):
        parent = field_type(key.rpartition(".")[0]) if "." in key else RunSettings
        known = (
            [f.name for f in dataclasses.fields(parent)] if dataclasses.is_dataclass(parent) else []
        )
        return f"{key} is not a setting; allowed keys: {', '.join(known)}"
    if isinstance(kind, type) and issubclass(kind, Enum):
        allowed = ", ".join(member.value for member in kind)
    elif kind in TYPE_NAMES:
        allowed = TYPE_NAMES[kind]
    else:
        return f"{key}: {str(error).splitlines()[0]}"
    return f"{key}={value!r} is not allowed; allowed values: {allowed}"


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def field_type(key: str) -> Any:
    """The schema's type for a dotted key (Optional unwrapped), or None for free-form keys."""
    node: Any = RunSettings
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
        if typing.get_origin(node) in (typing.Union, types.UnionType):
            arguments = [a for a in typing.get_args(node) if a is not type(None)]
            node = arguments[0] if len(arguments) == 1 else node
    return node


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


RANGES = [
    ("sparsity", lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    ("budget.macs", lambda v: v is None or 0 < v < 1, "null or a ratio in (0, 1)"),
    ("budget.params", lambda v: v is None or 0 < v < 1, "null or a ratio in (0, 1)"),
    ("budget.latency", lambda v: v is None or 0 < v < 1, "null or a ratio in (0, 1)"),
    ("budget.tolerance", lambda v: 0 < v < 0.5, "a number in (0, 0.5)"),
    ("pruner.confidence", lambda v: v > 1, "an integer > 1"),
    ("pruner.training_steps", lambda v: v >= 1, "an integer >= 1"),
    ("pruner.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("pruner.iterations", lambda v: v >= 1, "an integer >= 1"),
    ("pruner.recalibration_batches", lambda v: v >= 0, "an integer >= 0"),
    ("pruner.round_to", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    (
        "pruner.sparsity_scale",
        lambda v: all(_number(s.factor) and s.factor >= 0 for s in v),
        "a list of {layers: <fnmatch pattern>, factor: <number >= 0>}, e.g. "
        "[{layers: 'classifier.*', factor: 1.5}]",
    ),
    ("pruner.trace_input_size", lambda v: v is None or v >= 8, "null or an integer >= 8"),
    ("finetune.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("baseline.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("measure.repeats", lambda v: v >= 1, "an integer >= 1"),
    ("measure.rounds", lambda v: v >= 1, "an integer >= 1"),
    ("baseline.convergence.window", lambda v: v >= 1, "an integer >= 1"),
    ("baseline.convergence.tolerance", lambda v: v >= 0, "a number >= 0"),
    ("finetune.epochs", lambda v: v >= 0, "an integer >= 0"),
    ("finetune.warmup_epochs", lambda v: v >= 0, "an integer >= 0"),
    ("finetune.between_steps", lambda v: v >= 0, "an integer >= 0"),
    ("finetune.ema_decay", lambda v: 0 <= v < 1, "a number in [0, 1) (0: no averaging)"),
    ("baseline.warmup_epochs", lambda v: v >= 0, "an integer >= 0"),
    ("finetune.distill.alpha", lambda v: v is None or 0 <= v <= 1, "a number in [0, 1]"),
    ("finetune.distill.temperature", lambda v: v is None or v > 0, "a number > 0"),
    ("baseline.epochs", lambda v: v >= 0, "an integer >= 0"),
    ("measure.warmup", lambda v: v >= 0, "an integer >= 0"),
    ("max_batches", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("dataset.val_fraction", lambda v: v is None or 0 <= v < 1, "a number in [0, 1)"),
    ("dataset.test_fraction", lambda v: v is None or 0 < v < 1, "a number in (0, 1)"),
    ("search.max_accuracy_drop", lambda v: v >= 0, "a number >= 0"),
    ("search.metrics", lambda v: len(v) >= 1, "a non-empty list such as [accuracy, macs]"),
    (
        "pruner.config_list",
        lambda v: v is None or OmegaConf.is_list(v),
        "null or a list of NNI config dicts like [{sparsity_per_layer: 0.2, op_types: [Conv2d]}]",
    ),
]


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
    check_activation(typed.pruner._target_, typed.pruner.activation)
    asked_budget(typed.budget)
    for key in TARGETS:
        found = check_target(key, OmegaConf.select(typed, key))
        node = key.rpartition(".")[0]
        if node not in BUILT_BY_ADAPTER:
            check_arguments(node, found, OmegaConf.to_container(OmegaConf.select(typed, node)))
    return OmegaConf.to_object(typed)


# Rankers that count a channel's zero outputs (APoZ): the project's magnitudes (abs) are never
# zero, so under them every channel would tie; only NNI's own activations fit.
COUNTS_ZEROS = ("ActivationAPoZRankPruner",)


def check_activation(target: str, activation: Any) -> None:
    value = getattr(activation, "value", activation)
    if target.rsplit(".", 1)[-1] in COUNTS_ZEROS and value not in NNI_ACTIVATIONS:
        allowed = ", ".join(NNI_ACTIVATIONS)
        raise ConfigError(
            f"pruner.activation={value!r} is not allowed with pruner=apoz (it ranks channels by "
            f"their share of zero outputs, and a magnitude is never zero); allowed values: "
            f"{allowed}"
        )


def _failed_resolution(error: OmegaConfBaseException) -> str:
    """The line for a config that cannot be resolved: a ConfigError raised by a resolver (the
    imagefolder root) keeps its own line."""
    for cause in _causes(error):
        if isinstance(cause, ConfigError):
            return str(cause)
    return _one_line(error) if error.full_key else str(error)


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


# The pruner's settings are read by the NNI adapter, not passed to its class as they are.
BUILT_BY_ADAPTER = ("pruner",)


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
    import inspect

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
        if not (_number(value) and 0 < value < 1):
            raise ConfigError(
                f"{key}.{given[0]}={value!r} is not allowed; allowed values: a number in (0, 1)"
            )


def _without_hydra(tree: dict) -> dict:
    return {key: value for key, value in tree.items() if key != "hydra"}


def plain(settings: RunSettings) -> dict:
    """RunSettings as plain JSON-ready data (enums as their names), for records and params."""
    return OmegaConf.to_container(OmegaConf.structured(settings), enum_to_str=True)


def job_overrides(args: list[str]) -> list[list[str]]:
    """The override lists a command line stands for: one for a single run; for a `-m` sweep, the
    first job plus each other value of each swept key (enough to try every value once)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # Hydra's own parser tells the overrides from its flags (--cfg job, -m, ...); its settings
    # (launcher, sweeper, output dirs) are not part of a job's config.
    overrides = get_args_parser().parse_args(args).overrides
    wanted = [a for a in overrides if not a.lstrip("+~").startswith("hydra")]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(wanted)
        single = [a for a, o in zip(wanted, parsed, strict=True) if not o.is_sweep_override()]
        parsed += parser.parse_overrides(preset_sweep(single, wanted))
    except HydraException as error:
        raise ConfigError(str(error).strip().splitlines()[0]) from None
    # Sweeps that do not list their values (Optuna intervals) are left to the job's own check.
    parsed = [o for o in parsed if not o.is_sweep_override() or _listable(o)]
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            values = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            values = [f"{key}={override.get_value_element_as_str()}"]
        choices.append(values)
    first = [values[0] for values in choices]
    jobs = [first]
    for position, values in enumerate(choices):
        for value in values[1:]:
            jobs.append([*first[:position], value, *first[position + 1 :]])
    return jobs


def preset_sweep(single: list[str], given: list[str]) -> list[str]:
    """The `key=a,b` sweeps a preset (conf/sweep/) declares in hydra.sweeper.params, composed
    from the command line's `single` (not swept) overrides, for the keys it does not `given`."""
    params = OmegaConf.select(compose(single, with_hydra=True), "hydra.sweeper.params")
    given = {o.lstrip("+~").partition("=")[0] for o in given}
    return [f"{key}={value}" for key, value in (params or {}).items() if key not in given]


def _listable(override) -> bool:
    """Choice and range sweeps list their values; intervals (for Optuna) do not."""
    try:
        next(iter(override.sweep_string_iterator()), None)
    except Exception:
        return False
    return True


def check_command_line(args: list[str]) -> list[ConfigError]:
    """Compose and check every job the command line asks for, and what each points at (data,
    checkpoints, layers, tracking server).

    A single run, or a sweep none of whose jobs can run, raises the first ConfigError. A sweep
    whose other jobs can run gets back the errors of the failing ones: those fail alone, as
    FAILED runs, and the rest of the sweep goes on.
    """
    from pipeline.preflight import check_inputs

    errors, servers = [], set()
    jobs = job_overrides(args)
    for overrides in jobs:
        check_budget_or_sparsity(overrides)
    for overrides in jobs:
        try:
            settings = settings_from(compose(overrides))
            check_inputs(settings)
        except ConfigError as error:
            errors.append(error)
            continue
        if settings.tracking.enabled:
            servers.add(tracking_store(settings))
    for key, uri in sorted(servers):
        check_tracking_server(uri, key)
    if len(errors) == len(jobs):
        raise errors[0]
    return errors


BUDGET_KINDS = ("macs", "params", "latency")


def asked_budget(budget: Any) -> tuple[str, float] | None:
    """The cost target the settings ask for, (kind, ratio), or None; two at once are refused."""
    given = [(kind, getattr(budget, kind)) for kind in BUDGET_KINDS if getattr(budget, kind)]
    if len(given) > 1:
        keys = " and ".join(f"budget.{kind}={value}" for kind, value in given)
        raise ConfigError(
            f"{keys}: one budget at a time; allowed: one of budget.{{{','.join(BUDGET_KINDS)}}}"
        )
    return given[0] if given else None


def check_budget_or_sparsity(overrides: list[str]) -> None:
    """A budget replaces the sparsity: a command line that names both is refused."""
    given = dict(override.lstrip("+").partition("=")[::2] for override in overrides)
    budgets = [
        f"{key}={value}"
        for key, value in given.items()
        if key.removeprefix("budget.") in BUDGET_KINDS and value not in ("null", "")
    ]
    if budgets and "sparsity" in given:
        raise ConfigError(
            f"{budgets[0]} replaces sparsity, and sparsity={given['sparsity']} is given too; "
            f"allowed: a budget or a sparsity, not both"
        )


def tracking_store(settings: RunSettings) -> tuple[str, str]:
    """The setting that picks the tracking store, and the store's URI."""
    from pipeline.tracking import USER_TRACKING_URI, tracking_uri

    key = (
        "tracking.uri" if settings.tracking.uri or not USER_TRACKING_URI else "MLFLOW_TRACKING_URI"
    )
    return key, tracking_uri(settings.tracking.uri, settings.paths.output_root)
