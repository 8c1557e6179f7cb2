"""Checks that need the disk, the model or the network, made before any work: the dataset's
layout, the layers a config list names, the checkpoints' shapes, the tracking server.

`config.settings_from` checks what the settings say; these check that what they point at fits.
Each failure is one ConfigError line naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from pipeline.data_layout import check_layout
from pipeline.errors import ConfigError, WeightsUnavailableError
from pipeline.schema import RunSettings

# An unreachable server must fail in seconds, not after MLflow's two minutes of retries.
SERVER_TIMEOUT_S = 3.0
MODEL_WEIGHT_NAMES = ("none", "imagenet")  # model.weights values that are not checkpoint paths


def check_inputs(settings: RunSettings) -> None:
    """Everything a run will read fits the run, or one ConfigError line says what does not."""
    check_layout(dict(settings.dataset))
    checkpoints = _checkpoints(settings)
    layer_names = _op_names(settings.pruner.config_list)
    if not checkpoints and not layer_names:
        return  # the model is built only when something must be checked against it
    model = _bare_model(settings.model)
    for key, path in checkpoints:
        check_checkpoint_fits(key, path, model)
    check_layer_names(layer_names, model)


def _checkpoints(settings: RunSettings) -> list[tuple[str, str]]:
    found = []
    if settings.baseline.checkpoint:
        found.append(("baseline.checkpoint", str(settings.baseline.checkpoint)))
    weights = dict(settings.model).get("weights")
    if weights is not None and str(weights) not in MODEL_WEIGHT_NAMES:
        found.append(("model.weights", str(weights)))
    return found


def _op_names(config_list: Any) -> list[tuple[str, str]]:
    return [
        (f"pruner.config_list[{index}].op_names", str(name))
        for index, entry in enumerate(config_list or [])
        for name in (entry.get("op_names") or [])
    ]


def _bare_model(model_settings: Any):
    """The model's architecture with no weights loaded (none downloaded, no checkpoint read)."""
    from hydra.utils import instantiate

    overrides = {"weights": "none"} if "weights" in model_settings else {}
    return instantiate(model_settings, **overrides)


def check_checkpoint_fits(key: str, path: str, model) -> None:
    """The checkpoint is a state dict of tensors (no pickled code) with this model's names and
    shapes; the first difference is named, so a class-count mismatch reads as one."""
    from pipeline.models import load_state_dict, state_dict_mismatch

    try:
        state = load_state_dict(path, key=key)
    except WeightsUnavailableError as error:
        raise ConfigError(str(error)) from None
    problem = state_dict_mismatch(state, model)
    if problem is None:
        return
    raise ConfigError(
        f"{key}={path!r} is not allowed: it does not fit the model: {problem}; allowed values: "
        f"a state dict of this model"
    )


def check_layer_names(names: list[tuple[str, str]], model) -> None:
    """Every op_names entry of the config list names a layer of the model."""
    layers = {name for name, _ in model.named_modules() if name}
    for key, name in names:
        if name not in layers:
            prunable = [
                layer
                for layer, module in model.named_modules()
                if type(module).__name__ in ("Conv2d", "Linear")
            ]
            examples = ", ".join(prunable[:3] + ["..."] + prunable[-1:])
            raise ConfigError(
                f"{key}={name!r} is not allowed: the model has no such layer; allowed values: "
                f"names of its layers ({len(prunable)} Conv2d/Linear: {examples})"
            )


def check_tracking_server(uri: str, key: str = "tracking.uri") -> None:
    """An http(s) MLflow server answers its health check within SERVER_TIMEOUT_S."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return  # it answered: a server without /health (or behind a proxy) is still there
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(
            f"{key}={uri!r} is not reachable ({reason}); allowed values: a running MLflow "
            f"server, a sqlite:/// or file: store, or tracking=none"
        ) from None
