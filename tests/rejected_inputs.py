"""The bad inputs a new user tries (issue 14's table, then the ones handled before it): each must
end in seconds with exit code 2 and one line naming the key. Shared by
tests/test_rejected_inputs.py and benchmarks/time_to_error.py (which times each row)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Rejected:
    id: str
    overrides: Callable[[Path], list[str]]  # from a scratch folder for the files a row needs
    key: str  # the key the error line must name


class Payload:
    """Unpickling this creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


PAYLOAD_MARKER = "payload-ran"


def folder_of_files(scratch: Path) -> Path:
    folder = scratch / "no_class_folders"
    folder.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"\x89PNG")
    return folder


def truncated_checkpoint(scratch: Path) -> Path:
    path = scratch / "truncated.safetensors"
    save_file({"w": torch.zeros(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:100])
    return path


def pickle_payload(scratch: Path) -> Path:
    path = scratch / "payload.pt"
    path.write_bytes(pickle.dumps({"state_dict": Payload(scratch / PAYLOAD_MARKER)}))
    return path


def other_class_count(scratch: Path) -> Path:
    """A real MobileNetV2 state dict for 37 classes: digits has 10."""
    from pipeline.models.zoo import mobilenet_v2

    path = scratch / "pets_model.safetensors"
    if not path.exists():
        save_file(mobilenet_v2(num_classes=37).state_dict(), path)
    return path


ROWS = [
    # issue 14's table
    Rejected(
        "imagefolder-root-missing",
        lambda s: ["dataset=imagefolder", "dataset.root=/nonexistent/dir"],
        "dataset.root",
    ),
    Rejected(
        "imagefolder-no-class-folders",
        lambda s: [
            "dataset=imagefolder",
            f"dataset.root={folder_of_files(s)}",
            "dataset.num_classes=3",
        ],
        "dataset.root",
    ),
    Rejected(
        "config-list-without-sparsity",
        lambda s: ["pruner.config_list=[{op_types:[Conv2d]}]"],
        "pruner.config_list[0]",
    ),
    Rejected(
        "config-list-unknown-op-type",
        lambda s: ["pruner.config_list=[{sparsity:0.3,op_types:[Conv9d]}]"],
        "pruner.config_list[0].op_types",
    ),
    Rejected(
        "config-list-unknown-layer",
        lambda s: ["pruner.config_list=[{sparsity:0.3,op_names:[nolayer]}]"],
        "pruner.config_list[0].op_names",
    ),
    Rejected(
        "sparsity-scale-unknown-layer",
        lambda s: ["pruner.sparsity_scale=[{layers:clasifier.*,factor:1.5}]"],
        "pruner.sparsity_scale",
    ),
    Rejected(
        "finetune-optimizer-missing",
        lambda s: ["finetune.optimizer._target_=torch.optim.Nope"],
        "finetune.optimizer._target_",
    ),
    Rejected(
        "finetune-criterion-not-a-setting",
        lambda s: ["finetune.criterion._target_=nope.Loss"],
        "finetune.criterion",
    ),
    Rejected(
        "optimizer-argument-misspelt",
        lambda s: ["+finetune.optimizer.momentumm=0.9"],
        "finetune.optimizer.momentumm",
    ),
    Rejected("criterion-missing", lambda s: ["criterion._target_=nope.Loss"], "criterion._target_"),
    Rejected(
        "checkpoint-truncated",
        lambda s: [f"baseline.checkpoint={truncated_checkpoint(s)}"],
        "baseline.checkpoint",
    ),
    Rejected(
        "checkpoint-pickle-payload",
        lambda s: [f"baseline.checkpoint={pickle_payload(s)}"],
        "baseline.checkpoint",
    ),
    Rejected(
        "checkpoint-other-class-count",
        lambda s: [f"baseline.checkpoint={other_class_count(s)}"],
        "baseline.checkpoint",
    ),
    Rejected(
        "tracking-server-unreachable",
        lambda s: ["tracking.uri=http://127.0.0.1:9"],
        "tracking.uri",
    ),
    # handled before the table
    Rejected("imagefolder-without-root", lambda s: ["dataset=imagefolder"], "dataset.root"),
    Rejected("sparsity-out-of-range", lambda s: ["sparsity=2"], "sparsity"),
    Rejected("pruner-unknown", lambda s: ["pruner=magnitude"], "pruner"),
    Rejected("pruner-mode-unknown", lambda s: ["pruner.mode=greedy"], "pruner.mode"),
    Rejected(
        "pruner-activation-unknown", lambda s: ["pruner.activation=tanh"], "pruner.activation"
    ),
    Rejected(
        "pruner-activation-magnitude-with-apoz",
        lambda s: ["pruner=apoz", "pruner.activation=abs"],
        "pruner.activation",
    ),
    Rejected("pruner-confidence-too-small", lambda s: ["pruner.confidence=1"], "pruner.confidence"),
    Rejected("pruner-key-misspelt", lambda s: ["pruner.lrr=0.1"], "pruner.lrr"),
    # issue 12: a budget replaces the sparsity
    Rejected(
        "budget-and-sparsity",
        lambda s: ["budget.macs=0.5", "sparsity=0.3"],
        "budget.macs",
    ),
    # issue 13: any torchvision classifier
    Rejected(
        "torchvision-builder-unknown",
        lambda s: ["model=torchvision", "model.name=resnet19"],
        "model.name",
    ),
    Rejected(
        "model-bound-to-another-size",
        lambda s: ["model=torchvision", "model.name=vit_b_16"],  # 224 px only; digits are 32
        "model._target_",
    ),
]
