"""The stages one at a time: which channels a pruner picks, where the baseline comes from, which
epoch fine-tuning keeps, when the baseline cache is reused, and how speedup recovers."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file
from torch import nn

import pipeline.pruning.nni.adapter as nni_adapter
import pipeline.training.loop as training
from conftest import digits_inputs, prune_digits_model
from pipeline.data.datasets import Loaders, make_loaders
from pipeline.errors import SpeedupError
from pipeline.models.stats import count_params
from pipeline.models.zoo import mobilenet_v2
from pipeline.run import baseline_cache_path, run
from pipeline.stages.baseline import baseline
from pipeline.training.loop import EvalResult, evaluate, fit

# A pass through prune/speedup/finetune that costs next to nothing: an empty NNI config list
# masks no channel, so speedup has nothing to do; for tests about the other stages.
NO_PRUNING = ["pruner.config_list=[]", "pruner.iterations=1", "finetune.epochs=0"]


def kept_channels(masks) -> dict[str, torch.Tensor]:
    """Per masked layer, which output channels survive (a row of the weight mask not all zero)."""
    return {
        layer: layer_masks["weight"].flatten(1).abs().sum(dim=1) > 0
        for layer, layer_masks in masks.items()
    }


def test_apoz_and_mean_rank_keep_different_channels(tiny):
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10)
    kept = {}
    for pruner in ("apoz", "mean_rank"):
        result = prune_digits_model(tiny(f"pruner={pruner}"), 0.3, model=copy.deepcopy(model))
        assert result.masks, f"pruner={pruner} masked nothing"
        kept[pruner] = kept_channels(result.masks)

    apoz, mean_rank = kept["apoz"], kept["mean_rank"]
    # Same layers, same widths (both follow the same rounded config list) ...
    assert set(apoz) == set(mean_rank)
    assert {k: int(v.sum()) for k, v in apoz.items()} == {
        k: int(v.sum()) for k, v in mean_rank.items()
    }
    # ... but ranked by another criterion: other channels survive.
    differ = [layer for layer in apoz if not torch.equal(apoz[layer], mean_rank[layer])]
    assert differ, "pruner=apoz and pruner=mean_rank kept exactly the same channels everywhere"


def constant_channels(biases: list[float]) -> nn.Module:
    """A conv whose output channel k is the constant biases[k] whatever the image, then a head."""
    conv = nn.Conv2d(3, len(biases), 1)
    nn.init.zeros_(conv.weight)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor(biases))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(len(biases), 10))


@pytest.mark.parametrize(
    ("activation", "kept"),
    [
        # relu ranks a strongly negative channel as silent: the four negatives go.
        ("relu", [False] * 4 + [True] * 4),
        # abs ranks it by what it carries: the four near zero go.
        ("abs", [True] * 4 + [False] * 4),
    ],
)
def test_mean_rank_ranks_by_the_activation_transform_asked_for(tiny, activation, kept):
    settings = tiny(
        "pruner=mean_rank",
        f"pruner.activation={activation}",
        "pruner.mode=normal",
        "pruner.round_to=null",
        "pruner.config_list=[{sparsity_per_layer: 0.5, op_types: [Conv2d]}]",
    )
    model = constant_channels([-5.0, -4.0, -3.0, -2.0, 0.1, 0.2, 0.3, 0.4])

    result = prune_digits_model(settings, 0.5, model=model)

    assert kept_channels(result.masks)["0"].tolist() == kept


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_run_from_a_checkpoint_evaluates_those_weights_and_trains_no_baseline(tiny, tmp_path, kind):
    torch.manual_seed(99)  # not the run's seed: a model the run would not build by itself
    saved = mobilenet_v2(num_classes=10)
    state = {k: v.contiguous() for k, v in saved.state_dict().items()}
    if kind == "safetensors":
        checkpoint = tmp_path / "baseline.safetensors"
        save_file(state, checkpoint)
    else:  # what a training script's torch.save({"state_dict": ...}) leaves
        checkpoint = tmp_path / "baseline.pt"
        torch.save({"state_dict": state}, checkpoint)

    settings = tiny(f"baseline.checkpoint={checkpoint}", *NO_PRUNING)
    record = run(settings, tmp_path / "run")

    assert record["baseline_source"] == "checkpoint"
    assert record["baseline_history"] == []
    assert not (tmp_path / "outputs" / "cache" / "baselines").exists(), "a baseline was cached"
    # The baseline the run reports is the checkpoint's, evaluated on the run's own test batches.
    splits = instantiate(settings.dataset)
    loaders = make_loaders(
        splits, settings.baseline.batch_size, settings.seed, max_batches=settings.max_batches
    )
    direct = evaluate(saved, loaders.test, nn.CrossEntropyLoss(), torch.device("cpu"))
    assert record["baseline"]["test_samples"] == direct.samples
    assert record["baseline"]["accuracy"] == direct.accuracy
    assert record["baseline"]["loss"] == pytest.approx(direct.loss, rel=1e-5)


@pytest.mark.parametrize(
    ("accuracies", "best"),
    [([0.2, 0.5, 0.3], 2), ([0.4, 0.4, 0.1], 1)],
    ids=["best-in-the-middle", "a-tie-keeps-the-earlier-epoch"],
)
def test_fit_keeps_the_weights_of_the_best_validation_epoch(tiny, monkeypatch, accuracies, best):
    scores = iter(accuracies)
    monkeypatch.setattr(
        training, "evaluate", lambda *args, **kwargs: EvalResult(next(scores), 1.0, 1.0, 8)
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 4, 4), torch.randint(0, 3, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    snapshots = []
    settings = tiny("baseline.epochs=3", "baseline.schedule=constant", "baseline.lr=0.5").baseline

    result = fit(
        model,
        Loaders(loader, loader, loader),
        nn.CrossEntropyLoss(),
        settings,
        torch.device("cpu"),
        on_epoch=lambda row: snapshots.append(copy.deepcopy(model.state_dict())),
    )

    assert result.best_epoch == best
    assert [row["val_accuracy"] for row in result.history] == accuracies
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[best - 1][k]) for k in final)
    # Training moved the weights every epoch, so keeping the last epoch would differ.
    assert not all(torch.equal(final[k], snapshots[-1][k]) for k in final)


def test_baseline_cache_is_reused_only_for_the_same_training_settings(tiny):
    inputs = digits_inputs(batch_size=16, max_batches=2)

    def baseline_for(*overrides: str):
        settings = tiny(*overrides)  # unseeded: each model starts from other weights
        path = baseline_cache_path(settings)
        return baseline(mobilenet_v2(num_classes=10), inputs, settings.baseline, path)

    first = baseline_for()
    other_lr = baseline_for("baseline.lr=0.01")
    # Settings of later stages do not decide the baseline's weights.
    reused = baseline_for("sparsity=0.3", "finetune.lr=0.5", "pruner=apoz")

    assert first.source == "trained" and first.weights_path.is_file()
    assert other_lr.source == "trained", "a baseline trained at another lr came from the cache"
    assert other_lr.weights_path != first.weights_path and other_lr.weights_path.is_file()
    assert reused.source == "cache" and reused.weights_path == first.weights_path
    assert len(list(first.weights_path.parent.glob("*.safetensors"))) == 2
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(reused.model.state_dict()[name], tensor), name
    assert baseline_cache_path(tiny("baseline.epochs=2")) not in (
        first.weights_path,
        other_lr.weights_path,
    )


def small_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def half_of_first_conv(model: nn.Module):
    """NNI masks that remove the first convolution's even output channels."""
    conv = model[0]
    keep = torch.arange(conv.out_channels) % 2 == 1
    weight = torch.zeros_like(conv.weight)
    weight[keep] = 1.0
    return {"0": {"weight": weight, "bias": keep.float()}}


def test_speedup_retries_on_a_fresh_copy_with_four_times_the_samples(monkeypatch, caplog):
    real = nni_adapter.model_speedup
    confidences = []

    def first_attempt_fails(model, masks, shape, confidence, check_shape):
        confidences.append(confidence)
        if len(confidences) == 1:
            real(model, masks, shape, confidence, check_shape)  # leaves this copy pruned
            raise SpeedupError("inconsistent layer widths")
        return real(model, masks, shape, confidence, check_shape)

    monkeypatch.setattr(nni_adapter, "model_speedup", first_attempt_fails)
    model = small_convnet()
    before = count_params(model)
    with caplog.at_level(logging.WARNING, logger="pipeline.pruning.nni.adapter"):
        smaller = nni_adapter.speedup(model, half_of_first_conv(model), (3, 16, 16), 8)

    assert confidences == [8, 32]
    assert smaller[0].out_channels == 8 and smaller[3].in_channels == 8
    assert count_params(smaller) < before
    assert smaller(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    ours = [r.getMessage() for r in caplog.records if r.name == "pipeline.pruning.nni.adapter"]
    assert len(ours) == 1 and "speedup attempt 1 failed" in ours[0], ours


def test_speedup_gives_up_after_a_last_try_at_the_real_input_size(monkeypatch, caplog):
    attempts = []

    def always_fails(model, masks, shape, confidence, check_shape):
        attempts.append((shape, confidence))
        raise SpeedupError("inconsistent layer widths")

    monkeypatch.setattr(nni_adapter, "model_speedup", always_fails)
    model = small_convnet()
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.pruning.nni.adapter"),
        pytest.raises(SpeedupError, match="inconsistent layer widths"),
    ):
        nni_adapter.speedup(model, half_of_first_conv(model), (3, 32, 32), 8, trace_size=8)

    assert attempts == [((3, 8, 8), 8), ((3, 8, 8), 32), ((3, 32, 32), 32)]
    assert sum(r.name == "pipeline.pruning.nni.adapter" for r in caplog.records) == 2


def test_each_speedup_attempt_starts_from_the_pruners_masks(monkeypatch):
    real = nni_adapter.model_speedup
    received = []

    def first_attempt_fails(model, masks, shape, confidence, check_shape):
        received.append(sorted(masks))
        smaller = real(model, masks, shape, confidence, check_shape)
        if len(received) == 1:
            raise SpeedupError("inconsistent layer widths")
        return smaller

    monkeypatch.setattr(nni_adapter, "model_speedup", first_attempt_fails)
    model = small_convnet()
    nni_adapter.speedup(model, half_of_first_conv(model), (3, 16, 16), 8)
    assert received == [["0"], ["0"]], "the retry saw masks the first attempt inferred"
