"""End-to-end runs of all five stages on tiny configs."""

import json

import pytest
import torch

from conftest import DIGITS_SHAPE, prune_digits_model
from pipeline.data.datasets import Loaders, StageInputs
from pipeline.models.stats import count_params
from pipeline.models.zoo import mobilenet_v2
from pipeline.pruning.nni.adapter import speedup
from pipeline.run import run
from pipeline.stages.prune import prune

REQUIRED = ("accuracy", "top5", "params", "macs", "size_bytes", "latency_ms", "throughput")


def test_run_writes_measurements_and_a_smaller_model(tiny, tmp_path, capsys):
    record = run(tiny(), tmp_path / "run")

    saved = json.loads((tmp_path / "run" / "measurements.json").read_text())
    for side in ("baseline", "pruned"):
        for key in REQUIRED:
            assert key in saved[side], f"{side}.{key} missing from measurements.json"
        assert set(saved[side]["latency_ms"]) >= {"p50", "p90"}
        assert 0.0 <= saved[side]["accuracy"] <= 1.0
    assert set(saved["stages"]) == {"baseline", "prune", "speedup", "finetune", "measure"}
    assert all(stage["seconds"] > 0 for stage in saved["stages"].values())
    assert saved["config"]["pruner"]["_target_"].endswith(".ActivationMeanRankPruner")
    assert saved["pruned"]["params"] < saved["baseline"]["params"]
    assert saved["pruned"]["macs"] < saved["baseline"]["macs"]
    assert record["pruned"]["params"] == saved["pruned"]["params"]
    assert (tmp_path / "run" / "masks.safetensors").is_file()
    assert (tmp_path / "run" / "pruned_model" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "accuracy (top-1)" in out and "params" in out and "latency p50" in out


def test_without_tracking_the_run_still_records_resources_and_plots(tiny, tmp_path, capsys):
    overrides = ("tracking=none", "tracking.sample_interval_s=0.2", "measure.batch_sizes=[4,1]")
    run(tiny(*overrides), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "measurements.json").read_text())
    # Each batch size timed in its own paired rounds, the smallest first as the headline.
    rows = saved["latency_by_batch"]
    assert [row["batch_size"] for row in rows] == [1, 4]
    for row in rows:
        assert row["ci_low"] <= row["ratio"] <= row["ci_high"] and row["rounds"] > 1
        assert row["baseline_ms"]["p50"] > 0 and row["pruned_ms"]["p50"] > 0
        assert "peak_memory_mb" not in row  # CUDA only
    assert rows[1]["baseline_ms"]["p50"] > rows[0]["baseline_ms"]["p50"]
    assert saved["latency_ratio"]["ratio"] == rows[0]["ratio"]
    assert saved["baseline"]["latency_batch_size"] == 1
    # Each test image's outcome is kept, packed, for paired comparisons across runs.
    from pipeline.measure.uncertainty import unpack_outcomes

    for side in ("baseline", "pruned"):
        correct = unpack_outcomes(saved["outcomes"][side])
        assert len(correct) == saved[side]["test_samples"]
        assert correct.mean() == pytest.approx(saved[side]["accuracy"])
    out = capsys.readouterr().out
    assert "latency p50 (cpu, ms), batch 1 " in out and "latency p50 (cpu, ms), batch 4 " in out
    assert set(saved["resources"]) == {"baseline", "prune", "speedup", "finetune", "measure"}
    for stage, summary in saved["resources"].items():
        assert summary["peak_rss_mb"] > 100, f"{stage}: {summary}"  # torch alone is larger
        assert "mean_process_cpu_percent" in summary, stage
    for plot in ("resource_usage.png", "training_curves.png"):
        assert (tmp_path / "run" / plot).stat().st_size > 10_000, plot
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


@pytest.mark.slow
def test_a_cached_baseline_gives_the_same_numbers_as_a_trained_one(tiny, tmp_path):
    first = run(tiny(), tmp_path / "first")
    second = run(tiny(), tmp_path / "second")
    assert first["baseline_source"] == "trained"
    assert second["baseline_source"] == "cache"
    for side in ("baseline", "pruned"):
        for key in ("accuracy", "top5", "loss", "params", "macs"):
            assert second[side][key] == first[side][key], f"{side}.{key}"
    assert second["pruning"]["steps"] == first["pruning"]["steps"]
    assert second["finetune_history"] == first["finetune_history"]
    assert second["baseline_history"] == first["baseline_history"]
    assert second["accuracy_change"] == first["accuracy_change"]


def test_a_short_baseline_is_flagged_as_not_converged(tiny, tmp_path, capsys):
    record = run(tiny("baseline.epochs=2"), tmp_path / "run")
    assert record["baseline_convergence"]["converged"] is False
    saved = json.loads((tmp_path / "run" / "measurements.json").read_text())
    assert saved["baseline_convergence"]["converged"] is False
    assert "the baseline had not converged" in capsys.readouterr().out


def test_apoz_normal_relu6_completes(tiny, tmp_path):
    record = run(
        tiny("pruner=apoz", "pruner.mode=normal", "pruner.activation=relu6"),
        tmp_path / "run",
    )
    assert record["pruned"]["params"] < record["baseline"]["params"]
    assert record["config"]["pruner"]["activation"] == "relu6"


def test_user_config_list_replaces_the_default(tiny, tmp_path):
    record = run(
        tiny(
            "pruner.config_list=[{sparsity_per_layer: 0.5, op_types: [Linear]}]",
            "pruner.iterations=1",
        ),
        tmp_path / "run",
    )
    entries = record["pruning"]["config_list"]
    assert entries[0] == {"sparsity_per_layer": 0.5, "op_types": ["Linear"]}
    assert entries[-1]["exclude"] is True
    # Only Linear layers were pruned: the convolutional features keep their MACs share.
    assert record["pruned"]["params"] < record["baseline"]["params"]


def test_pruned_parameters_fall_as_sparsity_rises(tiny):
    settings = tiny()
    counts = []
    for sparsity in (0.05, 0.15, 0.5):
        result = prune_digits_model(settings, sparsity)
        pruned = speedup(result.model, result.masks, DIGITS_SHAPE, settings.pruner.confidence)
        assert pruned(torch.zeros(2, *DIGITS_SHAPE)).shape == (2, 10)
        counts.append(count_params(pruned))
    unpruned = count_params(mobilenet_v2(num_classes=10))
    assert unpruned > counts[0] > counts[1] > counts[2], counts


@pytest.mark.parametrize("mode", ["normal", "dependency_aware"])
def test_last_layer_keeps_its_outputs(tiny, mode):
    settings = tiny(f"pruner.mode={mode}")
    result = prune_digits_model(settings, 0.5)
    pruned = speedup(result.model, result.masks, DIGITS_SHAPE, 8)
    assert pruned.classifier[-1].out_features == 10
    assert pruned.classifier[-1].in_features < 128


def test_round_to_keeps_multiples_and_depthwise_follows(tiny):
    settings = tiny("pruner.round_to=16")
    result = prune_digits_model(settings, 0.3)
    assert all("sparsity_per_layer" in e or e.get("exclude") for e in result.config_list)
    assert result.masks, "nothing was pruned"
    for name, masks in result.masks.items():
        module = result.model.get_submodule(name)
        assert not (isinstance(module, torch.nn.Conv2d) and module.groups > 1), name
        rows = masks["weight"].flatten(1).abs().sum(dim=1) > 0
        kept, total = int(rows.sum()), rows.numel()
        assert kept == total or kept % 16 == 0, f"{name}: keeps {kept} of {total}"
    pruned = speedup(result.model, result.masks, DIGITS_SHAPE, 8)
    assert pruned(torch.zeros(2, *DIGITS_SHAPE)).shape == (2, 10)


def test_sparsity_scale_reaches_the_masks(tiny):
    settings = tiny(
        "pruner.round_to=16",
        "pruner.sparsity_scale=[{layers:classifier.*,factor:0},{layers:features.18.0,factor:1.8}]",
    )
    result = prune_digits_model(settings, 0.3)
    assert result.masks and not any(name.startswith("classifier") for name in result.masks)
    rows = result.masks["features.18.0"]["weight"].flatten(1).abs().sum(dim=1) > 0
    assert int(rows.sum()) == 592  # sparsity 0.54: 0.46 * 1280 = 589 -> 592, a multiple of 16
    rows = result.masks["features.17.conv.0.0"]["weight"].flatten(1).abs().sum(dim=1) > 0
    assert int(rows.sum()) == 672  # 0.7 * 960, unscaled


def test_sparsity_too_small_to_round_prunes_nothing(tiny):
    settings = tiny("pruner.round_to=16")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 30 * 30, 4),
    )
    data = torch.utils.data.TensorDataset(
        torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    inputs = StageInputs(
        Loaders(loader, loader, loader),
        torch.nn.CrossEntropyLoss(),
        torch.device("cpu"),
        (3, 32, 32),
    )
    result = prune(model, inputs, settings.pruner, 0.05)
    assert result.masks == {}
    assert speedup(result.model, result.masks, (3, 32, 32), 8) is model


@pytest.mark.parametrize("statistics", ["activation", "nni"])
def test_statistics_mode_decides_whether_pruning_trains_the_model(tiny, statistics):
    settings = tiny(f"pruner.statistics={statistics}")
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in mobilenet_v2(num_classes=10).state_dict().items()}
    result = prune_digits_model(settings, 0.3)
    after = result.model.state_dict()
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    # activation: forward passes only, on a BatchNorm-folded copy; nni: NNI's evaluator trains.
    assert unchanged == (statistics == "activation")
    assert result.masks
