"""How a configuration is made: Hydra composes conf/ (shipped inside the package as
`pipeline.conf`) onto the typed schema. A failed composition becomes one ConfigError line naming
the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
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

from pipeline.config import schema
from pipeline.config.schema import RunSettings
from pipeline.data.layout import class_count
from pipeline.errors import ConfigError

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
    for cause in causes(error):
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            return one_line(cause)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        named = f"'{key}/{value}'" in message or f"{key}={value}" in message
        if named and ("not found" in message or "Could not find" in message):
            allowed = ", ".join(group_choices(key))
            return f"{key}={value!r} is not allowed; allowed values: {allowed}"
    return message


def causes(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def one_line(error: OmegaConfBaseException) -> str:
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
