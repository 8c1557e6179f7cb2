"""Checks that need the disk, the model or the network, made before any work: the dataset's
layout, the runtime's package, the layers a config list names, the checkpoints' shapes, the
tracking server.

`pipeline.checks.settings.settings_from` checks what the settings say; these check that what
they point at fits. Each failure is one ConfigError line naming the key, the bad value and
what is allowed.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from pipeline.config.schema import LayerScale, PrunerSettings, RunSettings
from pipeline.data.layout import check_layout
from pipeline.errors import (
    ConfigError,
    RuntimeUnavailableError,
    WeightsUnavailableError,
    first_line,
)
from pipeline.training.distributed import check_launch

# An unreachable server must fail in seconds, not after MLflow's two minutes of retries.
SERVER_TIMEOUT_S = 3.0
MODEL_WEIGHT_NAMES = ("none", "imagenet")  # model.weights values that are not checkpoint paths


def check_inputs(settings: RunSettings) -> None:
    """Everything a run will read fits the run, or one ConfigError line says what does not."""
    check_launch(settings)
    check_layout(dict(settings.dataset))
    check_runtime(settings.measure.runtime.value, measured_on(settings.device.value))
    check_model_choice(settings.model)
    checkpoints = _checkpoints(settings)
    layer_names = _op_names(settings.pruner.config_list)
    model = _bare_model(settings.model)
    check_model_runs(model, settings)
    for key, path in checkpoints:
        check_checkpoint_fits(key, path, model)
    check_layer_names(layer_names, model)
    check_sparsity_scale(settings.pruner, model)
    check_ignored_layers(settings.pruner, model)


def check_ignored_layers(pruner: PrunerSettings, model: Any) -> None:
    """Every pruner.ignored_layers pattern names a layer: a misspelt one would spare nothing."""
    from fnmatch import fnmatchcase

    names = [name for name, _ in model.named_modules() if name]
    for pattern in pruner.ignored_layers or []:
        if not any(fnmatchcase(name, pattern) for name in names):
            raise ConfigError(
                f"pruner.ignored_layers: {pattern!r} matches no layer; allowed values: patterns "
                f"over the layer names, e.g. {names[0]!r}, '{names[-1].split('.')[0]}.*'"
            )


def check_sparsity_scale(pruner: PrunerSettings, model: Any) -> None:
    """pruner.sparsity_scale scales the default config list, and each pattern names a layer."""
    from pipeline.models.zoo import output_layer_name
    from pipeline.pruning.config_list import scaled_sparsity

    scales = LayerScale.as_mapping(pruner.sparsity_scale)
    if not scales:
        return
    if pruner.config_list is not None:
        raise ConfigError(
            "pruner.sparsity_scale scales the default config list, and pruner.config_list is "
            "given (set each layer's sparsity there); allowed values: [] with a config_list"
        )
    skip = {output_layer_name(model)} if pruner.exclude_last_layer else set()
    scaled_sparsity(model, 0.5, scales, skip)


def measured_on(device: str) -> str:
    """The device a run measures on, as pipeline.run.resolve_device will choose it."""
    import torch

    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def check_runtime(runtime: str, device: str | None = None) -> None:
    """The package measure.runtime needs is installed, and the runtime runs on `device`: a
    missing extra or a GPU runtime on the CPU fails before training, not in the measure stage."""
    from pipeline.measure.runtime_forms import require_runtime

    try:
        require_runtime(runtime, device)
    except RuntimeUnavailableError as error:
        raise ConfigError(str(error)) from None


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


TORCHVISION_BUILDER = "pipeline.models.torchvision_classifier"
LITE0_BUILDER = "pipeline.models.efficientnet_lite0"


def check_model_choice(model_settings: Any) -> None:
    """model.name is a torchvision classification builder; the extra that ships
    EfficientNet-Lite0's weights is installed when they are asked for."""
    from pipeline.models import zoo as models

    target = model_settings.get("_target_")
    if target == TORCHVISION_BUILDER:
        models.check_torchvision_name(model_settings.get("name"))
    if target == LITE0_BUILDER and model_settings.get("weights") == "imagenet":
        try:
            models.lite0_imagenet_state_path()
        except WeightsUnavailableError as error:
            raise ConfigError(str(error)) from None


def check_model_runs(model, settings: RunSettings) -> None:
    """The model classifies one image of the dataset's size into dataset.num_classes scores:
    what a builder of your own (model._target_) must do, and what a size-bound torchvision
    model (vit_*, maxvit_t: +model.image_size) does only at its own size."""
    import torch

    size = dict(settings.dataset).get("image_size")
    classes = dict(settings.dataset).get("num_classes")
    if size is None:
        return
    try:
        with torch.no_grad():
            scores = model.eval()(torch.zeros(1, 3, size, size))
    except Exception as error:
        raise ConfigError(
            f"model._target_={settings.model.get('_target_')!r} cannot classify "
            f"{size}x{size} images (dataset.image_size={size}): {type(error).__name__}: "
            f"{first_line(error)}"
        ) from None
    if not torch.is_tensor(scores) or tuple(scores.shape) != (1, classes):
        shape = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise ConfigError(
            f"model._target_={settings.model.get('_target_')!r} returns {shape} for one image; "
            f"allowed: a tensor of (batch, dataset.num_classes={classes}) class scores"
        )


def _bare_model(model_settings: Any):
    """The model's architecture with no weights loaded (none downloaded, no checkpoint read)."""
    from hydra.utils import instantiate

    overrides = {"weights": "none"} if "weights" in model_settings else {}
    try:
        return instantiate(model_settings, **overrides)
    except Exception as error:
        cause = error.__cause__ or error
        keys = ", ".join(k for k in model_settings if k != "_target_")
        raise ConfigError(
            f"model._target_={model_settings.get('_target_')!r} cannot be built from "
            f"model.{{{keys}}} ({type(cause).__name__}: {first_line(cause)}); allowed: the "
            f"builder's own arguments (a model file of its own, e.g. model=timm, or ~model.KEY "
            f"to drop one)"
        ) from None


def check_checkpoint_fits(key: str, path: str, model) -> None:
    """The checkpoint is a state dict of tensors (no pickled code) with this model's names and
    shapes; the first difference is named, so a class-count mismatch reads as one."""
    from pipeline.models.zoo import load_state_dict, state_dict_mismatch

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
