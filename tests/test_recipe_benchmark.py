"""benchmarks/recipe.py: recipes are config presets run by the pipeline itself, rows resume,
and the table (recipe_table.py) says what the rows show."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import matplotlib.image
import pytest

from pipeline.config.compose import group_choices
from pipeline.config.identity import config_identity
from pipeline.pruning.budget import SEARCH_METHOD
from test_fashion_mnist import make_fashion_files

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its siblings
    return load("recipe")


@pytest.fixture
def table(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return load("recipe_table")


def test_overrides_after_a_list_option_are_not_read_as_its_values(recipe, tmp_path):
    args = recipe.parse_args(
        ["--seeds", "1", "2", "max_batches=2", "--budgets", "0.5", "~tracking", "--json", "x"]
    )
    assert args.seeds == [1, 2]
    assert args.budgets == [0.5]
    assert args.overrides == ["max_batches=2", "~tracking"]
    assert args.plot == args.output_root / "recipe_pareto.png"


def test_a_recipe_is_a_config_preset_the_pipeline_runs(recipe):
    """Every conf/recipe file is a recipe of the benchmark, and the benchmark's run of it is
    the pipeline's run of `+recipe=<name>`: the reference is NNI one-shot with Adam."""
    args = recipe.parse_args(["--train-limit", "300"])
    assert args.recipes == group_choices("recipe")
    assert {"default", "reference"} <= set(args.recipes)
    reference = recipe.settings_for(args, 1, "reference")
    assert reference.pruner.iterations == 1 and reference.pruner.round_to is None
    assert reference.finetune.optimizer["_target_"] == "torch.optim.Adam"
    default = recipe.settings_for(args, 1, "default")
    assert default.pruner.iterations > 1
    assert default.budget.tolerance == 0.01  # every recipe's MACs within 0.01 of the budget
    # ... on either side where a recipe's steps jump over [budget - 0.01, budget]
    assert {recipe.settings_for(args, 1, r).budget.fallback for r in args.recipes} == {"nearest"}
    # The default recipe is the project's defaults: the same job as no recipe at all.
    project = recipe.common.project_settings
    assert config_identity(project(["+recipe=default"])) == config_identity(project([]))
    with pytest.raises(SystemExit):
        recipe.parse_args(["--recipes", "no_such_recipe"])


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


def test_aggregates_summary_and_plot(table, tmp_path):
    accuracies = {"reference": 0.84, "default": 0.89, "peer": 0.88}
    rows = [
        made_up_row(name, budget, seed, accuracy + 0.002 * seed)
        for seed in (0, 1)
        for budget in (0.5, 0.35, 0.25)
        for name, accuracy in accuracies.items()
    ] + [made_up_row("control", None, seed, 0.906) for seed in (0, 1)]
    entries = table.aggregate(rows, [*accuracies, "control"])
    # Largest budget first, recipes in the order asked, the control last.
    assert [(e["budget"], e["recipe"]) for e in entries][:3] == [
        (0.5, "reference"),
        (0.5, "default"),
        (0.5, "peer"),
    ]
    assert entries[-1]["recipe"] == "control"
    default = entries[1]
    assert default["points_lost"]["mean"] == pytest.approx(0.9)
    assert default["accuracy"]["min"] == pytest.approx(0.89)
    assert default["accuracy"]["max"] == pytest.approx(0.892)
    line = table.format_entry(default)
    assert line.split()[:5] == ["0.5", "default", "2", "0.8910", "(0.8900-0.8920)"]
    assert line.endswith("-1.00[-2.00,+0.00] -0.80[-1.80,+0.20]")
    summary = table.summary(entries)
    assert "MACs 0.5: default loses 0.90 pts (target <= 0.5: MISSED)" in summary
    assert "MACs 0.35: default/reference loss 0.153 (0.90/5.90 pts; target <= 0.333: met)" in (
        summary
    )
    assert "default - peer accuracy, pts:" in summary
    assert "0.25: +1.00 (seeds +1.00/+1.00: ahead at every seed)" in summary
    # Seeds that disagree on the sign are said to.
    mixed = [dict(row) for row in rows]
    for row in mixed:
        if row["recipe"] == "peer" and row["budget"] == 0.5:
            row["change_points"] += 2.0 if row["seed"] == 0 else -2.0
    assert "0.5: +1.00 (seeds -1.00/+3.00: seeds disagree)" in table.summary(
        table.aggregate(mixed, [*accuracies, "control"])
    )
    converged = {"converged": True, "reason": "flat"}
    assert "the baseline is not converged" in table.control_line(entries, converged)
    damaging = table.aggregate(
        [made_up_row("control", None, seed, 0.895) for seed in (0, 1)], ["control"]
    )
    line = table.control_line(damaging, converged)
    assert "-0.50 pts" in line and "the fine-tuning itself costs" in line
    image = matplotlib.image.imread(table.plot(entries, 0.9, tmp_path / "pareto.png"))
    assert image.shape[0] > 300 and image.shape[1] > 600  # both panels, not an empty figure
    assert image[..., :3].std() > 0.05


def with_outcomes(row: dict, correct: list[bool], val_accuracy: float) -> dict:
    from pipeline.measure.uncertainty import pack_outcomes

    return row | {"outcomes": pack_outcomes(correct), "val_accuracy": val_accuracy}


def test_recipes_are_compared_image_by_image_against_the_best_peer_on_validation(table):
    """The paired difference pools each seed's test images; the peer is the best other recipe
    on validation, whatever the test set says; ahead/behind/level come from the interval."""
    rng = random.Random(0)
    images = 400
    truth = {  # per seed: default right on 90 %, peer on 85 %, weak on 60 % of the images
        seed: {
            name: [rng.random() < p for _ in range(images)]
            for name, p in (("default", 0.90), ("peer", 0.85), ("weak", 0.60))
        }
        for seed in (0, 1)
    }
    # weak is best on validation at 0.5, peer elsewhere.
    val = {"default": 0.89, "peer": 0.88, "weak": 0.5}
    rows = [
        with_outcomes(
            made_up_row(name, budget, seed, sum(truth[seed][name]) / images),
            truth[seed][name],
            0.95 if (name == "weak" and budget == 0.5) else val[name],
        )
        for seed in (0, 1)
        for budget in (0.5, 0.35)
        for name in ("default", "peer", "weak")
    ]
    assert table.best_other(rows, 0.5, "default") == "weak"
    assert table.best_other(rows, 0.35, "default") == "peer"
    at = [r for r in rows if r["budget"] == 0.35]
    change = table.paired_difference(
        [r for r in at if r["recipe"] == "default"], [r for r in at if r["recipe"] == "peer"]
    )
    from pipeline.measure.uncertainty import accuracy_change

    expected = accuracy_change(
        truth[0]["peer"] + truth[1]["peer"], truth[0]["default"] + truth[1]["default"]
    )
    assert change["points"] == pytest.approx(expected["points"])
    assert change["images"] == 2 * images and change["seeds"] == 2
    assert change["verdict"] == table.standing(change)
    assert table.standing({"ci_low": 0.1, "ci_high": 2.0}) == "ahead"
    assert table.standing({"ci_low": -2.0, "ci_high": -0.1}) == "behind"
    assert table.standing({"ci_low": -0.1, "ci_high": 2.0}) == "level"
    lines = table.paired_lines(rows, ["default", "peer", "weak"])
    assert lines[0].startswith("  0.5       default vs weak (best other on validation): +")
    assert lines[0].endswith(": ahead")  # 90 % against 60 % over 800 pairs
    summary = table.summary(table.aggregate(rows, ["default", "peer", "weak"]), rows)
    assert "default - weak accuracy, pts: 0.5: +" in summary and "] paired: ahead" in summary
    # A row stored before per-image outcomes gives no paired figure, and says so.
    old = [{k: v for k, v in r.items() if k != "outcomes"} for r in rows]
    assert table.paired_difference(old[:1], old[1:2]) is None


def test_each_family_is_refereed_at_its_best_on_validation(table):
    """Per budget each family runs as its member with the best validation accuracy, and the
    targets are read on those: paired against Torch-Pruning, loss shares against the reference."""
    rng = random.Random(1)
    images = 500
    # Test accuracy per recipe; validation prefers torch_pruning_global, reference_kenning and
    # pipeline_tp (worse on test), so the test set's favourites must not be the ones compared.
    test = {
        "default": 0.90, "pipeline_tp": 0.86, "torch_pruning": 0.89,
        "torch_pruning_global": 0.80, "reference": 0.86, "reference_kenning": 0.84,
    }  # fmt: skip
    val = {
        "default": 0.9, "pipeline_tp": 0.95, "torch_pruning": 0.7,
        "torch_pruning_global": 0.8, "reference": 0.7, "reference_kenning": 0.8,
    }  # fmt: skip
    rows = []
    for seed in (0, 1):
        for budget in (0.5, 0.35, 0.25):
            for name, p in test.items():
                correct = [rng.random() < p for _ in range(images)]
                row = made_up_row(name, budget, seed, sum(correct) / images)
                rows.append(with_outcomes(row, correct, val[name]))
    bests = table.family_bests(rows)
    assert bests[(0.5, "torch_pruning")] == "torch_pruning_global"
    assert bests[(0.35, "reference")] == "reference_kenning"
    assert bests[(0.25, "pipeline")] == "pipeline_tp"
    lines = table.refereed(rows)
    assert lines[0].startswith(
        "refereed MACs 0.5: pipeline best - Torch-Pruning best (pipeline_tp - "
        "torch_pruning_global): +"
    )
    assert lines[0].endswith(": ahead")  # 86 % against 80 % over 1,000 pairs
    assert lines[3].startswith(
        "refereed: pipeline never behind Torch-Pruning: met; ahead at 3 of 3"
    )
    assert (
        lines[4].startswith("refereed MACs 0.35: pipeline_tp loses ")
        and "reference_kenning" in (lines[4])
    )
    assert lines[-3] == "refereed: every row's MACs within 0.01 of its budget: met (36 of 36 rows)"
    # The target at 0.5 is read on the recipe a budget run defaults to; mean_rank's beside it.
    assert lines[-2].startswith("refereed MACs 0.5: pipeline_tp (the default for budgets) loses ")
    assert lines[-1].startswith("refereed MACs 0.5: default (mean_rank) loses ")


def test_a_row_outside_the_macs_window_is_named(table):
    rows = [made_up_row(name, 0.35, 1, 0.88) for name in ("default", "torch_pruning")]
    rows[1]["macs_ratio"] = 0.3387  # Torch-Pruning's quick-start jumps from 0.3503 to it
    rows.append(made_up_row("control", None, 1, 0.9))
    assert table.macs_window_line(rows) == (
        "refereed: every row's MACs within 0.01 of its budget: MISSED (1 of 2 rows; "
        "outside: torch_pruning seed 1 at MACs 0.35: 0.3387)"
    )
    # budget.fallback=nearest lands it over the budget, within the window: met, and named.
    rows[1]["macs_ratio"] = 0.3503
    assert table.macs_window_line(rows) == (
        "refereed: every row's MACs within 0.01 of its budget: met (2 of 2 rows; "
        "over it: torch_pruning seed 1 at MACs 0.35: 0.3503)"
    )
    rows[1]["macs_ratio"] = 0.3601  # more than the window over it
    assert "MISSED" in table.macs_window_line(rows)
    rows[1]["macs_ratio"] = 0.34  # exactly the window below it, up to float rounding
    assert "met (2 of 2 rows)" in table.macs_window_line(rows)


def test_the_default_for_budgets_is_the_recipe_a_budget_run_composes(recipe, table):
    from pipeline.config.budget_pruner import budget_pruner_override

    project = recipe.common.project_settings
    plain = ["budget.macs=0.5"]
    as_run = project([*plain, budget_pruner_override(plain)])
    as_recipe = project([*plain, f"+recipe={table.DEFAULT_FOR_BUDGETS}"])
    assert config_identity(as_run) == config_identity(as_recipe)


def test_a_setting_is_chosen_from_validation_lines_that_show_no_test_figure(recipe):
    row = made_up_row("default", 0.25, 1234, 0.5) | {"val_accuracy": 0.9, "sparsity": 0.41}
    (header, line) = recipe.validation_lines([row], ["pruner.activation=relu"], 6000)
    assert header == "# validation only; overrides: pruner.activation=relu"
    # 1.96 * sqrt(0.9 * 0.1 / 6000) = 0.0076; the test accuracy (0.5) appears nowhere.
    assert line == (
        "default MACs 0.25 seed 1234: validation accuracy 0.9000 +-0.0076 over 6000 images, "
        "sparsity 0.4100, MACs ratio 0.2400"
    )
    assert "0.5" not in line


def test_a_resumed_benchmark_states_the_cost_of_its_cached_rows(recipe, table, tmp_path):
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
    assert table.cost_line(rows, 1000.0, 600.0).endswith("took 300 s: 700 s")
    assert table.cost_line(rows, 1000.0, None).endswith("took 300 s: 1300 s")
    unknown = [{"accuracy": 0.9, "cached": True}]
    assert "1 cached rows of unknown cost" in table.cost_line(unknown, 10.0, None)


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
    # Rows of other pipeline code, or other pruning libraries, are computed again.
    assert set(origin) >= {"code", "nni", "torch_pruning"} and len(origin["code"]) == 16
    row = recipe.cached_row(path, lambda: {"accuracy": 0.6}, here | {"code": "other"})
    assert row["accuracy"] == 0.6 and "computed with another code" in capsys.readouterr().err
    path.write_text('{"accuracy": 0.9, "seconds": 300.0}')  # stored before provenance was
    assert recipe.cached_row(path, lambda: {"accuracy": 0.8}, here)["accuracy"] == 0.8


@pytest.mark.slow
def test_the_benchmark_runs_the_pipeline_and_resumes(recipe, tmp_path, capsys):
    """A tiny benchmark end to end: one baseline, every recipe pruned to the MACs budget by the
    pipeline, the control, the table; run again, every row comes from its file."""
    root = make_fashion_files(tmp_path / "fashion", train=300, test=60)
    argv = [
        *("--train-limit", "200", "--baseline-epochs", "1", "--finetune-epochs", "1"),
        *("--budgets", "0.5", "--seeds", "1", "--output-root", str(tmp_path / "out")),
        *("--json", str(tmp_path / "rows.json")),
        f"dataset.root={root}",
        # No pruner.training_steps: the torch_pruning recipe's criterion reads none, and refuses it.
        *("max_batches=2", "pruner.recalibration_batches=2"),
        # Two steps for every recipe (the global one takes 20 a probe, most of this test's time
        # otherwise); each recipe's own settings are checked in the tests above.
        "pruner.iterations=2",
        *("measure.repeats=3", "measure.warmup=1", "measure.rounds=2"),
    ]
    recipe.main(argv)
    first = json.loads((tmp_path / "rows.json").read_text())
    recipes = {row["recipe"] for row in first["rows"]}
    assert recipes == {*group_choices("recipe"), "control"}
    for row in first["rows"]:
        if row["recipe"] != "control":
            assert row["met"] and row["macs_ratio"] <= 0.5  # the pipeline's own budget search
            assert 0.0 < row["sparsity"] < 1.0
        assert row["provenance"]["budget_search"] == SEARCH_METHOD
        assert 0.0 <= row["val_accuracy"] <= 1.0
        assert row["outcomes"]["images"] == 60  # the test images, one bit each
    out = capsys.readouterr().out
    assert "(best other on validation):" in out
    assert "refereed: pipeline never behind Torch-Pruning:" in out
    assert "MACs 0.5: default loses" in out and "control (fine-tuning alone" in out
    recipe.main(argv)
    again = json.loads((tmp_path / "rows.json").read_text())
    assert all(row.get("cached") for row in again["rows"])
    assert [row["accuracy"] for row in again["rows"]] == [row["accuracy"] for row in first["rows"]]
    assert f"0 rows computed now, {len(first['rows'])} cached rows" in capsys.readouterr().out
