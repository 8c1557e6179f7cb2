"""Save and load pruned models without NNI and without unpickling code.

A pruned model is the original architecture with some Conv2d / BatchNorm2d / Linear layers
replaced by narrower ones. We store the weights as safetensors and, in JSON, the builder that
makes the original architecture plus the shape of every such layer; loading rebuilds the
original, swaps in layers of the recorded shapes and loads the weights strictly.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import WeightsUnavailableError
from pipeline.files import atomic_path

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "architecture.json"
# Only builders from this package may be named in a saved architecture: loading runs no other code.
ALLOWED_BUILDER_PREFIX = "pipeline.models."


def _conv2d(m: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": list(m.padding) if not isinstance(m.padding, str) else m.padding,
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _linear(m: nn.Linear) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
    }


def _batchnorm2d(m: nn.BatchNorm2d) -> dict[str, Any]:
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


LAYER_SHAPES = {"Conv2d": _conv2d, "Linear": _linear, "BatchNorm2d": _batchnorm2d}
LAYER_TYPES = {"Conv2d": nn.Conv2d, "Linear": nn.Linear, "BatchNorm2d": nn.BatchNorm2d}


def build_from_config(model_config: dict[str, Any]) -> nn.Module:
    """Call the builder named by `_target_` (which must live in pipeline.models)."""
    config = dict(model_config)
    target = config.pop("_target_")
    if not target.startswith(ALLOWED_BUILDER_PREFIX):
        raise ValueError(f"model builder {target!r} is not in {ALLOWED_BUILDER_PREFIX}*")
    module_name, _, function = target.rpartition(".")
    return getattr(importlib.import_module(module_name), function)(**config)


def describe(model: nn.Module, model_config: dict[str, Any]) -> dict[str, Any]:
    """The JSON architecture record; fails if the model holds a layer we could not rebuild."""
    reference = dict(build_from_config(model_config).named_modules())
    layers = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in LAYER_SHAPES:
            layers[name] = {"type": kind, **LAYER_SHAPES[kind](module)}
        elif name not in reference or type(reference[name]) is not type(module):
            raise TypeError(f"cannot describe layer {name!r} of type {kind} for a pickle-free save")
    return {"format": FORMAT_VERSION, "model": model_config, "layers": layers}


def save_pruned(model: nn.Module, model_config: dict[str, Any], directory: str | Path) -> Path:
    """Write model.safetensors and architecture.json into `directory`, all or nothing."""
    directory = Path(directory)
    config = dict(model_config) | {"weights": "none"}
    record = describe(model, config)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory, directory=True) as staging:
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": str(FORMAT_VERSION)})
        (staging / ARCHITECTURE_FILE).write_text(json.dumps(record, indent=2))
    return directory


def load_pruned(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by save_pruned, in eval mode; needs neither NNI nor pickle.
    A missing, truncated or foreign folder is refused with one WeightsUnavailableError line."""
    directory = Path(directory)
    try:
        record = json.loads((directory / ARCHITECTURE_FILE).read_text())
        if record.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported pruned-model format {record.get('format')!r}")
        model = build_from_config(record["model"])
        for name, spec in record["layers"].items():
            spec = dict(spec)
            layer = LAYER_TYPES[spec.pop("type")]
            for key in ("kernel_size", "stride", "padding", "dilation"):
                if isinstance(spec.get(key), list):
                    spec[key] = tuple(spec[key])
            model.set_submodule(name, layer(**spec))
        model.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise WeightsUnavailableError(
            f"{directory}: not a pruned model that load_pruned can read "
            f"({type(error).__name__}: {reason}); allowed values: a folder written by save_pruned "
            f"({ARCHITECTURE_FILE} + {WEIGHTS_FILE})"
        ) from None
    return model.to(device).eval()


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """ONNX export with a dynamic batch dimension, for runtimes outside PyTorch."""
    path = Path(path)
    model = model.eval().cpu()
    dummy = torch.zeros(1, *input_shape)
    with atomic_path(path) as staging:
        _onnx_export(model, dummy, staging)
    return path


def _onnx_export(model: nn.Module, dummy: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
