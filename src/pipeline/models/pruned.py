"""Save and load pruned models without NNI and without unpickling code.

A pruned model is the original architecture with some Conv2d / BatchNorm2d / Linear layers
replaced by narrower ones, and other modules whose own tensors or integer widths shrank with
them (a ViT's class token and hidden_dim, an attention's input projection and head_dim). We
store the weights as safetensors and, in JSON, the builder that makes the original
architecture plus the shape of every such layer and the new shapes and widths of those
modules; loading rebuilds the original, swaps in layers of the recorded shapes, resizes the
others and loads the weights strictly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import WeightsUnavailableError, first_line
from pipeline.files import atomic_path
from pipeline.models.zoo import ChannelScale, build_from_config

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "architecture.json"


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


def _layernorm(m: nn.LayerNorm) -> dict[str, Any]:
    return {
        "normalized_shape": list(m.normalized_shape),
        "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
        "bias": m.bias is not None,
    }


def _channel_scale(m: ChannelScale) -> dict[str, Any]:
    return {"channels": m.weight.shape[0]}


LAYER_SHAPES = {
    "Conv2d": _conv2d,
    "Linear": _linear,
    "BatchNorm2d": _batchnorm2d,
    "LayerNorm": _layernorm,
    "ChannelScale": _channel_scale,
}
# Any other module whose own tensors (a class token, a position embedding, an attention's
# input projection) or integer widths pruning changed: their new shapes and values.
OWN_TENSORS = "OwnTensors"
LAYER_TYPES = {
    "Conv2d": nn.Conv2d,
    "Linear": nn.Linear,
    "BatchNorm2d": nn.BatchNorm2d,
    "LayerNorm": nn.LayerNorm,
    "ChannelScale": ChannelScale,
}


def _kind(module: nn.Module) -> str | None:
    """The recorded kind of a layer whose shape pruning may change (subclasses included, such as
    torchvision's LayerNorm2d); None for every other module."""
    for kind, layer_type in LAYER_TYPES.items():
        if isinstance(module, layer_type):
            return kind
    return None


def describe(
    model: nn.Module, model_config: dict[str, Any], trusted: Sequence[str] = ()
) -> dict[str, Any]:
    """The JSON architecture record; fails if the model holds a layer we could not rebuild:
    another type than the builder's, or another kind of layer whose tensors changed shape."""
    reference = dict(build_from_config(model_config, trusted).named_modules())
    layers = {}
    for name, module in model.named_modules():
        kind = _kind(module)
        original = reference.get(name)
        if original is None or type(original) is not type(module):
            raise TypeError(
                f"cannot describe layer {name!r} of type {type(module).__name__} for a "
                f"pickle-free save"
            )
        if kind is not None:
            layers[name] = {"type": kind, **LAYER_SHAPES[kind](module)}
            continue
        own, before = _own_shapes(module), _own_shapes(original)
        if set(own) != set(before):
            raise TypeError(
                f"cannot describe layer {name!r} of type {type(module).__name__}: pruning "
                f"added or removed its tensors"
            )
        shapes = {key: list(shape) for key, shape in own.items() if shape != before[key]}
        widths = {
            key: value
            for key, value in _int_attributes(module).items()
            if _int_attributes(original).get(key, value) != value
        }
        if shapes or widths:
            layers[name] = {"type": OWN_TENSORS, "shapes": shapes, "attributes": widths}
    return {"format": FORMAT_VERSION, "model": model_config, "layers": layers}


def _narrower(original: nn.Module, layer: type, spec: dict[str, Any]) -> nn.Module:
    """A `layer` of the recorded shape in place of `original`. A subclass (torchvision's
    LayerNorm2d, timm's BatchNormAct2d) keeps its own forward and settings; one whose
    constructor takes other arguments (timm's LayerNorm) gets the base class's tensors and
    its own attributes and children."""
    if not isinstance(original, layer):
        return layer(**spec)
    try:
        return type(original)(**spec)
    except TypeError:  # another constructor: the base class's tensors, the subclass's rest
        narrower = layer(**spec)
        settings = {k: v for k, v in vars(original).items() if k not in vars(narrower)}
        children = {k: v for k, v in original._modules.items() if k not in narrower._modules}
        narrower.__class__ = type(original)
        narrower.__dict__.update(settings)
        narrower._modules.update(children)
        return narrower


def _int_attributes(module: nn.Module) -> dict[str, int]:
    """The integers a module computes with besides its tensors' shapes: an attention's
    embed_dim, head_dim and num_heads, a ViT's hidden_dim."""
    return {k: v for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}


def _resize_own(module: nn.Module, spec: dict[str, Any]) -> None:
    """Give a rebuilt module the tensor shapes and integer widths describe() recorded: its
    tensors are placeholders until the saved weights are loaded into them (strictly)."""
    for key, shape in spec["shapes"].items():
        if key in module._parameters:
            old = module._parameters[key]
            module._parameters[key] = nn.Parameter(
                torch.empty(shape, dtype=old.dtype), requires_grad=old.requires_grad
            )
        elif key in module._buffers:
            module._buffers[key] = torch.empty(shape, dtype=module._buffers[key].dtype)
        else:
            raise ValueError(f"{type(module).__name__} has no tensor {key!r}")
    for key, value in spec["attributes"].items():
        if not isinstance(value, int) or key not in _int_attributes(module):
            raise ValueError(f"{type(module).__name__} has no integer attribute {key!r}")
        setattr(module, key, value)


def _own_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return {name: tuple(tensor.shape) for name, tensor in tensors}


def save_pruned(
    model: nn.Module,
    model_config: dict[str, Any],
    directory: str | Path,
    trusted: Sequence[str] = (),
) -> Path:
    """Write model.safetensors and architecture.json into `directory`, all or nothing.
    `trusted`: see build_from_config."""
    directory = Path(directory)
    config = dict(model_config)
    if "weights" in config:
        config["weights"] = "none"  # the saved tensors hold them
    record = describe(model, config, trusted)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(directory, directory=True, size_hint=size) as staging:
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": str(FORMAT_VERSION)})
        (staging / ARCHITECTURE_FILE).write_text(json.dumps(record, indent=2))
    return directory


def load_pruned(
    directory: str | Path, device: str | torch.device = "cpu", trusted: Sequence[str] = ()
) -> nn.Module:
    """Rebuild a model saved by save_pruned, in eval mode; needs neither NNI nor pickle.
    A missing, truncated or foreign folder is refused with one WeightsUnavailableError line.
    `trusted`: module prefixes of your own builders that may be called (e.g. ["my_models."]);
    the builders of pipeline.models always may."""
    directory = Path(directory)
    try:
        record = json.loads((directory / ARCHITECTURE_FILE).read_text())
        model = build_described(record, trusted)
        state = load_file(directory / WEIGHTS_FILE)
        # Modules that version their state (torchvision's MNASNet) read the version from the
        # state dict's metadata, which safetensors does not hold: the rebuilt model's is theirs.
        state = OrderedDict(state)
        state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
        model.load_state_dict(state, strict=True)
    except Exception as error:
        reason = first_line(error)
        raise WeightsUnavailableError(
            f"{directory}: not a pruned model that load_pruned can read "
            f"({type(error).__name__}: {reason}); allowed values: a folder written by save_pruned "
            f"({ARCHITECTURE_FILE} + {WEIGHTS_FILE})"
        ) from None
    return model.to(device).eval()


def build_described(record: dict[str, Any], trusted: Sequence[str] = ()) -> nn.Module:
    """The architecture `describe` recorded, with fresh weights: the builder's model, its
    pruned layers narrowed as recorded."""
    if record.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported pruned-model format {record.get('format')!r}")
    model = build_from_config(record["model"], trusted)
    for name, spec in record["layers"].items():
        spec = dict(spec)
        if spec["type"] == OWN_TENSORS:
            _resize_own(model.get_submodule(name), spec)
            continue
        layer = LAYER_TYPES[spec.pop("type")]
        for key in ("kernel_size", "stride", "padding", "dilation", "normalized_shape"):
            if isinstance(spec.get(key), list):
                spec[key] = tuple(spec[key])
        model.set_submodule(name, _narrower(model.get_submodule(name), layer, spec))
    return model


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
