"""benchmarks/recipe.py without a benchmark run: its command line, the aggregates, summary and
plot from made-up rows, and the Torch-Pruning recipe landing on a MACs budget."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.model_stats import count_macs
from pipeline.models import mobilenet_v2
from pipeline.stages.budget import SEARCH_METHOD

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
HAS_TORCH_PRUNING = importlib.util.find_spec("torch_pruning") is not None


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling _common
    spec = importlib.util.spec_from_file_location("recipe_benchmark", BENCHMARKS / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overrides_after_a_list_option_are_not_read_as_its_values(recipe, tmp_path):
    args = recipe.parse_args(
        ["--seeds", "1", "2", "max_batches=2", "--budgets", "0.5", "~tracking", "--json", "x"]
    )
    assert args.seeds == [1, 2]
    assert args.budgets == [0.5]
    assert args.overrides == ["max_batches=2", "~tracking"]
    assert args.plot == args.output_root / "recipe_pareto.png"


def test_rows_cache_key_follows_the_options(recipe):
    one = recipe.parse_args(["--train-limit", "300"])
    key = recipe.recipe_key
    assert key(one, "default") == key(recipe.parse_args(["--train-limit", "300"]), "default")
    assert key(one, "default") != key(recipe.parse_args(["--train-limit", "400"]), "default")
    # Which rows a run computes is not part of what they depend on: a probe's rows are reused.
    probe = ["--train-limit", "300", "--recipes", "default", "--budgets", "0.5", "--no-control"]
    assert key(recipe.parse_args(probe), "default") == key(one, "default")
    finer = recipe.parse_args(["--train-limit=300", "finetune.lr=0.02"])
    names = [*recipe.RECIPES, recipe.CONTROL]
    assert len({key(one, name) for name in names}) == len(names)
    assert all(key(one, name) != key(finer, name) for name in names)
    # A pruner setting changes the rows that prune with the pipeline, not Torch-Pruning's and
    # not the controls' (they share only fine-tuning and measurement with it).
    pruner = recipe.parse_args(["--train-limit=300", "pruner.training_steps=7"])
    assert key(one, "default") != key(pruner, "default")
    assert key(one, "reference") != key(pruner, "reference")
    assert key(one, "torch_pruning") == key(pruner, "torch_pruning")
    assert key(one, recipe.CONTROL) == key(pruner, recipe.CONTROL)
    # Empty settings leave the key as it was before they existed (rows stay cached), and the
    # reference pins pruner.sparsity_scale empty whatever the default says.
    empty = recipe.parse_args(["--train-limit=300", "pruner.sparsity_scale=[]"])
    assert all(key(one, name) == key(empty, name) for name in names)
    assert recipe.without_empty({"a": {}, "b": {"c": [], "d": 0}, "e": None}) == {
        "b": {"d": 0},
        "e": None,
    }
    assert "pruner.sparsity_scale=[]" in recipe.RECIPES["reference"]
    # So do options added later at the value that changes nothing (finetune=reference keeps
    # the model's dropout rates); another value is another key.
    keep = recipe.parse_args(["--train-limit=300", "finetune.dropout=keep"])
    assert key(one, "reference") == key(keep, "reference")
    assert all(key(one, name) != key(keep, name) for name in names if name != "reference")
    assert recipe.without_neutral({"finetune": {"dropout": "keep", "lr": 0.1}, "x": 1}) == {
        "finetune": {"lr": 0.1},
        "x": 1,
    }
    assert recipe.without_neutral({"finetune": {"dropout": "scaled"}}) == {
        "finetune": {"dropout": "scaled"}
    }
    # finetune.ema_decay came later still: at 0 (no averaging) every recipe keeps its rows.
    none = recipe.parse_args(["--train-limit=300", "finetune.ema_decay=0"])
    assert all(key(one, name) == key(none, name) for name in names)
    averaged = recipe.parse_args(["--train-limit=300", "finetune.ema_decay=0.998"])
    assert all(key(one, name) != key(averaged, name) for name in names)


def made_up_row(recipe: str, budget: float | None, seed: int, accuracy: float) -> dict:
    macs = 1.0 if budget is None else budget - 0.01
    return {
        "recipe": recipe,
        "budget": budget,
        "seed": seed,
        "baseline_accuracy": 0.90,
        "accuracy": accuracy,
        "points_lost": 100 * (0.90 - accuracy),
        "change_points": 100 * (accuracy - 0.90),
        "change_ci": [100 * (accuracy - 0.91), 100 * (accuracy - 0.89)],
        "macs_ratio": macs,
        "params_ratio": macs,
        "latency_ratio": macs + 0.1 * seed,
        "met": True,
        "search": "pipeline",
    }


def test_aggregates_summary_and_plot(recipe, tmp_path):
    accuracies = {"reference": 0.84, "default": 0.89, "torch_pruning": 0.88}
    rows = [
        made_up_row(name, budget, seed, accuracy + 0.002 * seed)
        for seed in (0, 1)
        for budget in (0.5, 0.35, 0.25)
        for name, accuracy in accuracies.items()
    ] + [made_up_row("control", None, seed, 0.906) for seed in (0, 1)]
    entries = recipe.aggregate(rows)
    default = next(e for e in entries if e["budget"] == 0.5 and e["recipe"] == "default")
    assert default["points_lost"]["mean"] == pytest.approx(0.9)
    assert default["accuracy"]["min"] == pytest.approx(0.89)
    assert default["accuracy"]["max"] == pytest.approx(0.892)
    assert len(default["change"]) == 2
    for entry in entries:
        assert recipe.format_entry(entry)
    line = recipe.summary(entries)
    assert "MACs 0.5: default loses 0.90 pts (target <= 0.5: MISSED)" in line
    assert "MACs 0.35: default/reference loss 0.153 (0.90/5.90 pts; target <= 0.333: met)" in line
    assert "0.25: +1.00 (seeds +1.00/+1.00: ahead at every seed)" in line  # default - tp
    # Seeds that disagree on the sign are said to.
    mixed = [dict(row) for row in rows]
    for row in mixed:
        if row["recipe"] == "torch_pruning" and row["budget"] == 0.5:
            row["change_points"] += 2.0 if row["seed"] == 0 else -2.0
    assert "0.5: +1.00 (seeds -1.00/+3.00: seeds disagree)" in recipe.summary(
        recipe.aggregate(mixed)
    )
    info = {"convergence": {"converged": True, "reason": "flat"}}
    assert "the baseline is not converged" in recipe.control_line(entries, info)
    damaging = recipe.aggregate([made_up_row("control", None, seed, 0.895) for seed in (0, 1)])
    line = recipe.control_line(damaging, info)
    assert "-0.50 pts" in line and "the fine-tuning itself costs" in line
    assert recipe.plot(entries, 0.9, tmp_path / "pareto.png").stat().st_size > 0


def test_a_resumed_benchmark_states_the_cost_of_its_cached_rows(recipe, tmp_path):
    path = tmp_path / "rows" / "default-b0.5-s1.json"
    here = {"baseline_sha256": "ab", "cpu": "this CPU", "torch": "2.x"}
    fresh = recipe.cached_row(path, lambda: {"accuracy": 0.9}, here)
    assert "cached" not in fresh and fresh["seconds"] >= 0 and fresh["provenance"] == here
    stored = {"accuracy": 0.9, "seconds": 300.0, "provenance": here}
    path.write_text(json.dumps(stored))
    again = recipe.cached_row(path, lambda: pytest.fail("a cached row is not recomputed"), here)
    assert again == stored | {"cached": True}
    rows = [again, {"accuracy": 0.8, "seconds": 100.0}]
    # 1,000 s of wall time of which the baseline's training took 600: 400 now, 300 earlier.
    assert recipe.cost_line(rows, 1000.0, 600.0).endswith("took 300 s: 700 s")
    assert recipe.cost_line(rows, 1000.0, None).endswith("took 300 s: 1300 s")
    unknown = [{"accuracy": 0.9, "cached": True}]
    assert "1 cached rows of unknown cost" in recipe.cost_line(unknown, 10.0, None)


def test_rows_from_another_machine_or_baseline_are_computed_again(recipe, tmp_path, capsys):
    path = tmp_path / "default-b0.5-s1.json"
    there = {"baseline_sha256": "ab", "cpu": "another CPU", "torch": "2.x"}
    recipe.cached_row(path, lambda: {"accuracy": 0.8}, there)
    here = there | {"cpu": "this CPU"}
    row = recipe.cached_row(path, lambda: {"accuracy": 0.9}, here)
    assert row["accuracy"] == 0.9 and "cached" not in row and row["provenance"] == here
    assert "computed with another cpu: computing again" in capsys.readouterr().err
    same = recipe.cached_row(path, lambda: pytest.fail("same provenance: cached"), here)
    assert same["cached"] and same["accuracy"] == 0.9
    checkpoint = tmp_path / "baseline.safetensors"
    checkpoint.write_bytes(b"weights")
    origin = recipe.provenance(checkpoint)
    checkpoint.write_bytes(b"other weights")
    assert recipe.provenance(checkpoint)["baseline_sha256"] != origin["baseline_sha256"]
    # Rows whose budgets another search found (same settings, same key) are computed again.
    assert origin["budget_search"] == SEARCH_METHOD
    searched_before = here | {"budget_search": "bisection"}
    recipe.cached_row(path, lambda: {"accuracy": 0.7}, searched_before)
    row = recipe.cached_row(path, lambda: {"accuracy": 0.9}, here | {"budget_search": "new"})
    assert row["accuracy"] == 0.9 and "cached" not in row
    assert "computed with another budget_search" in capsys.readouterr().err
    path.write_text('{"accuracy": 0.9, "seconds": 300.0}')  # stored before provenance was
    assert recipe.cached_row(path, lambda: {"accuracy": 0.8}, here)["accuracy"] == 0.8


@pytest.mark.skipif(not HAS_TORCH_PRUNING, reason="needs the benchmarks extra (torch-pruning)")
def test_torch_pruning_recipe_lands_in_the_macs_budget(recipe):
    """At MACs 0.25 channels rounded to 8 jump from 0.262 to 0.212 of the baseline's MACs: the
    search goes on unrounded and lands in [B - 0.02, B]; the baseline is left whole."""
    shape = (3, 32, 32)
    model = mobilenet_v2(num_classes=10, head=[1024, 512, 128])  # conf/model/mobilenet_v2.yaml
    base = count_macs(model, shape)
    pruned, info = recipe.torch_pruning_to_budget(model, 0.25, shape, 0.02, 4, 8)
    assert 0.23 <= count_macs(pruned, shape) / base <= 0.25
    assert info["tp_round_to"] is None
    assert count_macs(model, shape) == base


@pytest.mark.skipif(not HAS_TORCH_PRUNING, reason="needs the benchmarks extra (torch-pruning)")
def test_torch_pruning_fine_tunes_between_its_steps_as_the_pipeline_does(recipe):
    """finetune.between_steps reaches Torch-Pruning too: after every step but the last, on the
    model that step left (its README's "finetune your model here")."""
    shape = (3, 32, 32)
    model = mobilenet_v2(num_classes=10, head=[1024, 512, 128])
    seen = []

    def between(index, pruned):
        seen.append((index, count_macs(pruned, shape)))
        pruned.features[0][0].weight.data.zero_()  # stands for fine-tuned weights

    pruned = recipe.torch_pruning_model(model, 0.5, shape, 3, 8, between)
    assert [index for index, _ in seen] == [1, 2]
    assert count_macs(model, shape) > seen[0][1] > seen[1][1] > count_macs(pruned, shape)
    # The later steps pruned the model the callback changed, not a copy of it.
    assert not pruned.features[0][0].weight.any()
