"""Model builders, named by `_target_` in conf/model/*.yaml, and checkpoint loading."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import WeightsUnavailableError


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
    from torchvision.models import MobileNet_V2_Weights
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    model = tv_mobilenet_v2(weights=None)
    if weights == "imagenet":
        try:
            state = MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as error:  # network, hub cache or checksum failures all end the same way
            raise WeightsUnavailableError(
                f"model.weights=imagenet: torchvision's MobileNet_V2 weights could not be loaded "
                f"({type(error).__name__}: {error}); put them in the torch hub cache "
                f"({torch.hub.get_dir()}/checkpoints) or pass a checkpoint path"
            ) from None
        model.load_state_dict(state)
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
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise WeightsUnavailableError(
            f"{key}={path}: unreadable checkpoint ({type(error).__name__}: {reason})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsUnavailableError(f"{key}={path}: not a state dict of tensors")
    return state


def state_dict_mismatch(state: Mapping[str, torch.Tensor], model: nn.Module) -> str | None:
    """How `state` does not fit `model`: the first tensor whose shape differs (so a class-count
    mismatch reads as one), else the tensors missing or extra; None when it fits."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
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
