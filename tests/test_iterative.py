"""Iterative pruning: equal steps that compound to the requested sparsity, each rounding the
current widths, with BatchNorm statistics re-estimated after each speedup."""

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.zoo import mobilenet_v2
from pipeline.pruning.config_list import MAX_LAYER_SPARSITY, resolve_config_list, step_sparsity
from pipeline.run import run
from pipeline.tracking.monitor import StageMonitor
from pipeline.training.loop import cycled_batches, recalibrate_batchnorm


@pytest.mark.parametrize("count", [1, 2, 4, 7])
@pytest.mark.parametrize("sparsity", [0.05, 0.5, 0.7])
def test_equal_steps_compound_to_the_requested_sparsity(sparsity, count):
    assert math.isclose((1 - step_sparsity(sparsity, count)) ** count, 1 - sparsity)
    assert step_sparsity(sparsity, 1) == sparsity


def test_each_step_rounds_the_current_widths():
    model = mobilenet_v2(num_classes=10)
    step = step_sparsity(0.5, 4)  # about 0.16
    entries = resolve_config_list(None, 0.5, True, model, round_to=16, steps=4)
    pruned = {e["op_names"][0]: e["sparsity_per_layer"] for e in entries if not e.get("exclude")}
    # 1280 * 0.84 = 1076 -> 1072 kept; 32 * 0.84 = 27 -> 32 kept: the stem is left alone.
    assert int(pruned["features.18.0"] * 1280) == 1280 - 1072
    assert "features.0.0" not in pruned
    for name, share in pruned.items():
        layer = model.get_submodule(name)
        width = getattr(layer, "out_channels", None) or layer.out_features
        kept = width - int(share * width)
        assert kept % 16 == 0 and abs(kept - (1 - step) * width) <= 8, (name, width, kept)
    one_shot = resolve_config_list(None, 0.5, True, model, round_to=16)
    assert {e["op_names"][0] for e in one_shot if not e.get("exclude")} > set(pruned)


def test_user_config_lists_are_split_into_equal_steps():
    model = mobilenet_v2(num_classes=10)
    user = [{"sparsity_per_layer": 0.5, "op_types": ["Linear"]}]
    entries = resolve_config_list(user, 0.15, True, model, 16, steps=2)
    assert math.isclose(entries[0]["sparsity_per_layer"], 1 - math.sqrt(0.5))
    assert entries[0]["op_types"] == ["Linear"]
    assert user[0]["sparsity_per_layer"] == 0.5  # the user's list is left as it was


def test_cycled_batches_go_round_a_short_loader_and_stop_on_an_empty_one():
    assert list(cycled_batches([1, 2, 3], 7)) == [1, 2, 3, 1, 2, 3, 1]
    assert list(cycled_batches([1, 2, 3], 2)) == [1, 2]
    assert list(cycled_batches([], 5)) == []


def test_recalibration_replaces_stale_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    bn = model[1]
    bn.running_mean.fill_(100.0)
    bn.running_var.fill_(100.0)
    weights = [p.clone() for p in model.parameters()]
    images = torch.randn(32, 3, 8, 8) * 2 + 1
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.zeros(32)), batch_size=8
    )
    model.eval()
    recalibrate_batchnorm(model, loader, 8, torch.device("cpu"))  # 8 > 4 batches: it cycles
    with torch.no_grad():
        conv_out = model[0](images)
    torch.testing.assert_close(bn.running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_var, conv_out.var(dim=(0, 2, 3)), rtol=0.05, atol=1e-3)
    assert bn.momentum == 0.1 and not model.training
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_a_stage_entered_again_adds_up():
    with StageMonitor(interval=60.0) as monitor:
        for _ in range(3):
            with monitor.stage("prune"):
                sum(range(10_000))
        first = monitor.stage_seconds["prune"]["seconds"]
        with monitor.stage("prune"):
            sum(range(10_000))
    assert monitor.stage_seconds["prune"]["seconds"] > first > 0


def test_iterative_run_prunes_in_steps_and_keeps_every_steps_masks(tiny, tmp_path):
    one_shot = run(tiny("pruner.iterations=1"), tmp_path / "one_shot")
    stepped = run(tiny("pruner.iterations=3"), tmp_path / "stepped")

    steps = stepped["pruning"]["steps"]
    assert [row["step"] for row in steps] == [1, 2, 3]
    params = [row["params"] for row in steps]
    assert stepped["baseline"]["params"] > params[0] > params[1] > params[2]
    assert params[-1] == stepped["pruned"]["params"]
    # Narrow layers are pruned less in steps; the total stays near the one-shot count.
    assert one_shot["pruned"]["params"] <= params[-1] < 1.1 * one_shot["pruned"]["params"]
    assert len(one_shot["pruning"]["steps"]) == 1
    with safe_open(tmp_path / "stepped" / "masks.safetensors", "pt") as masks:
        prefixes = {key.split("/")[0] for key in masks.keys()}  # noqa: SIM118
        assert masks.metadata()["steps"] == "3"
    assert prefixes == {"step1", "step2", "step3"}
    with safe_open(tmp_path / "one_shot" / "masks.safetensors", "pt") as masks:
        assert not any("/" in key for key in masks.keys())  # noqa: SIM118


@pytest.mark.slow
@pytest.mark.parametrize(("recalibrate", "expected"), [("every_step", 3), ("last_step", 1)])
def test_batchnorm_is_re_estimated_after_the_steps_asked(
    tiny, tmp_path, monkeypatch, recalibrate, expected
):
    import pipeline.stages.speedup as speedup_stage

    widths = []

    def counted(model, loader, num_batches, device):
        widths.append(sum(p.numel() for p in model.parameters()))
        return recalibrate_batchnorm(model, loader, num_batches, device)

    monkeypatch.setattr(speedup_stage, "recalibrate_batchnorm", counted)
    record = run(tiny("pruner.iterations=3", f"pruner.recalibrate={recalibrate}"), tmp_path / "run")
    assert len(widths) == expected
    # The last re-estimation is always on the final model.
    assert widths[-1] == record["pruned"]["params"]
    # Each step's row says whether its val accuracy had fresh statistics.
    flags = [row["batchnorm_reestimated"] for row in record["pruning"]["steps"]]
    assert flags == ([True] * 3 if recalibrate == "every_step" else [False, False, True])


def _stepped(tiny, sparsity: float = 0.5):
    from conftest import digits_inputs
    from pipeline.pruning.steps import prune_in_steps

    settings = tiny("pruner.iterations=3", "pruner.round_to=null")
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10)
    torch.manual_seed(1)
    return prune_in_steps(model, digits_inputs(max_batches=2), settings.pruner, sparsity)


@pytest.mark.slow
def test_layer_dependencies_are_traced_once_and_prune_as_traced_every_step(tiny, monkeypatch):
    from nni.algorithms.compression.v2.pytorch.pruning.tools.sparsity_allocator import (
        DependencyAwareAllocator,
    )

    from pipeline.pruning.nni.adapter import LayerDependencies

    traced = DependencyAwareAllocator._get_dependency
    calls = []

    def counted(allocator, dummy_input):
        calls.append(1)
        return traced(allocator, dummy_input)

    monkeypatch.setattr(DependencyAwareAllocator, "_get_dependency", counted)
    shared = _stepped(tiny)
    assert len(calls) == 1
    # Traced afresh at every step, as NNI does: the same masks and the same model.
    monkeypatch.setattr(LayerDependencies, "fit", lambda self, model: False)
    fresh = _stepped(tiny)
    assert len(calls) == 1 + 3
    assert shared.tied.channel == fresh.tied.channel
    for ours, theirs in zip(shared.masks_by_step, fresh.masks_by_step, strict=True):
        assert ours.keys() == theirs.keys()
        for layer in ours:
            assert torch.equal(ours[layer]["weight"], theirs[layer]["weight"]), layer
    assert [p.shape for p in shared.model.parameters()] == [
        p.shape for p in fresh.model.parameters()
    ]


def test_dependencies_hold_while_only_widths_change_not_a_channel_multiplier():
    from pipeline.pruning.nni.adapter import layer_signature

    def net(width: int, multiplier: int = 1) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, width, 1),
            nn.Conv2d(width, width * multiplier, 3, groups=width),
            nn.Conv2d(width * multiplier, 8, 1, groups=1),
        )

    assert layer_signature(net(32)) == layer_signature(net(16))
    assert layer_signature(net(32, multiplier=2)) != layer_signature(net(16, multiplier=2))


def test_fine_tuning_between_steps_takes_its_epochs_from_the_fine_tuning(
    tiny, tmp_path, monkeypatch
):
    import pipeline.run as run_module

    calls = []
    real = run_module.finetune

    def counted(model, inputs, settings, teacher=None, on_epoch=None, **rest):
        calls.append((settings.epochs, sum(p.numel() for p in model.parameters())))
        return real(model, inputs, settings, teacher=teacher, on_epoch=on_epoch, **rest)

    monkeypatch.setattr(run_module, "finetune", counted)
    overrides = ("pruner.iterations=3", "finetune.epochs=4", "finetune.between_steps=1")
    record = run(tiny(*overrides), tmp_path / "run")
    steps = record["pruning"]["steps"]
    # One epoch after steps 1 and 2, each on the model that step left; the other two at the end.
    assert calls == [(1, steps[0]["params"]), (1, steps[1]["params"]), (2, steps[2]["params"])]
    assert len(record["finetune_history"]) == 2
    assert [("finetuned_val_accuracy" in row) for row in steps] == [True, True, False]
    assert record["pruning"]["finetune_between_steps"] == 1


@pytest.mark.slow
def test_the_next_step_prunes_the_model_fine_tuned_between_steps(tiny, tmp_path, monkeypatch):
    """With finetune.between_steps the weights a step ranks are those the fine-tuning after
    the step before returned, not the weights it started from."""
    import pipeline.pruning.steps as steps
    import pipeline.run as run_module

    def fingerprint(model: nn.Module) -> float:
        return sum(p.detach().double().sum().item() for p in model.parameters())

    pruned_from, tuned = [], []
    real_prune, real_finetune = steps.prune, run_module.finetune

    def recorded_prune(model, *args, **kwargs):
        pruned_from.append(fingerprint(model))
        return real_prune(model, *args, **kwargs)

    def recorded_finetune(model, *args, **kwargs):
        result = real_finetune(model, *args, **kwargs)
        tuned.append(fingerprint(result.model))
        return result

    monkeypatch.setattr(steps, "prune", recorded_prune)
    monkeypatch.setattr(run_module, "finetune", recorded_finetune)
    overrides = ("pruner.iterations=3", "finetune.epochs=4", "finetune.between_steps=1")
    run(tiny(*overrides), tmp_path / "run")
    assert len(pruned_from) == 3 and len(tuned) == 3  # two between the steps, one at the end
    assert pruned_from[1] == tuned[0] and pruned_from[2] == tuned[1]
    assert pruned_from[1] != pruned_from[0]


@pytest.mark.parametrize(
    ("epochs", "between", "iterations", "expected"),
    [
        (12, 1, 4, 1),  # 1 + 1 + 1 between the steps, 9 after the last
        (12, 2, 4, 2),
        (12, 4, 4, 0),  # would leave nothing for after the last step
        (1, 1, 4, 0),  # short test runs fine-tune only at the end
        (0, 1, 4, 0),
        (12, 1, 1, 0),  # one-shot: no step between
        (12, 0, 4, 0),
    ],
)
def test_epochs_between_steps(epochs, between, iterations, expected):
    from pipeline.config.schema import FinetuneSettings
    from pipeline.stages.finetune import split_epochs

    settings = FinetuneSettings(epochs=epochs, between_steps=between)
    assert split_epochs(settings, iterations) == (expected, epochs - expected * (iterations - 1))


def kept_widths(model: nn.Module, entries: list[dict]) -> dict[str, int]:
    widths = {}
    for entry in entries:
        if entry.get("exclude"):
            continue
        (name,) = entry["op_names"]
        layer = model.get_submodule(name)
        width = getattr(layer, "out_channels", None) or layer.out_features
        widths[name] = width - int(entry["sparsity_per_layer"] * width)
    return widths


def test_sparsity_scale_multiplies_the_sparsity_of_the_layers_it_names():
    model = mobilenet_v2(num_classes=10)
    scales = {"classifier.*": 1.5, "features.1?.conv.2": 0.0}
    kept = kept_widths(model, resolve_config_list(None, 0.5, True, model, 16, 1, scales))
    # classifier: sparsity 0.75 -> 1024 * 0.25 = 256 kept; the rest at 0.5: 1280 -> 640.
    assert kept["classifier.0"] == 256 and kept["classifier.3"] == 128
    assert kept["features.18.0"] == 640 and kept["features.2.conv.0.0"] == 48
    assert not {f"features.{i}.conv.2" for i in range(10, 18)} & set(kept)  # spared
    assert "features.5.conv.2" in kept  # one digit: not matched by features.1?.conv.2
    assert "classifier.9" not in kept  # the last layer stays excluded
    # Without rounding: one exact entry per layer, depthwise convolutions still left out.
    exact = resolve_config_list(None, 0.5, True, model, None, 2, {"classifier.*": 1.5})
    shares = {e["op_names"][0]: e["sparsity_per_layer"] for e in exact if not e.get("exclude")}
    assert math.isclose(shares["classifier.0"], step_sparsity(0.75, 2))
    assert math.isclose(shares["features.18.0"], step_sparsity(0.5, 2))
    assert "features.2.conv.1.0" not in shares


def test_sparsity_scale_caps_a_layer_and_rejects_a_pattern_that_names_none():
    model = mobilenet_v2(num_classes=10)
    entries = resolve_config_list(None, 0.5, True, model, None, 1, {"features.18.0": 10.0})
    capped = next(e for e in entries if e.get("op_names") == ["features.18.0"])
    assert capped["sparsity_per_layer"] == MAX_LAYER_SPARSITY
    with pytest.raises(ConfigError, match=r"^pruner.sparsity_scale: layers='clasifier\.\*'"):
        resolve_config_list(None, 0.5, True, model, 16, 1, {"clasifier.*": 1.5})
    # The first pattern that matches a layer decides its factor.
    first = resolve_config_list(
        None, 0.5, True, model, 16, 1, {"classifier.0": 0, "classifier.*": 1.5}
    )
    assert "classifier.0" not in kept_widths(model, first)
