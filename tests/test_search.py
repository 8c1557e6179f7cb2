"""Searches with the Optuna sweeper (conf/sweep/search_*.yaml) and the values a job returns to
it (pipeline.sweeps.objectives)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT, TINY, run_cli
from pipeline.checks.settings import settings_from
from pipeline.config.compose import CONFIG_MODULE, CONFIG_NAME, compose
from pipeline.sweeps.objectives import FAILED, constrained_sparsity, objective


def record(accuracy=0.9, change=-0.5, ci_low=-2.0, macs=1e6, p50=3.0) -> dict:
    """The part of measurements.json the objectives read."""
    pruned = {
        "accuracy": accuracy,
        "top5": 1.0,
        "params": 1000,
        "macs": macs,
        "size_bytes": 4000,
        "latency_ms": {"p50": p50, "p90": p50 * 1.1},
        "throughput": 500.0,
    }
    return {"pruned": pruned, "accuracy_change": {"points": change, "ci_low": ci_low}}


def test_the_default_objective_is_the_pruned_accuracy(tiny):
    assert objective(record(accuracy=0.875), tiny()) == 0.875


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # the record's drop is 0.5 points: within the default 1-point limit, the sparsity
        (["sparsity=0.4"], 0.4),
        # 0.25 points over a 0.25-point limit: minus the excess as a fraction
        (["sparsity=0.4", "search.max_accuracy_drop=0.25"], -0.0025),
        # exactly at the limit is allowed
        (["sparsity=0.4", "search.max_accuracy_drop=0.5"], 0.4),
        # the upper end of the interval: a drop of up to 2 points, 1 over a 1-point limit
        (["sparsity=0.4", "search.drop_estimate=upper"], -0.01),
        (["sparsity=0.4", "search.drop_estimate=upper", "search.max_accuracy_drop=2"], 0.4),
    ],
)
def test_constrained_sparsity(tiny, overrides, expected):
    settings = tiny("search.objective=constrained_sparsity", *overrides)
    assert objective(record(change=-0.5, ci_low=-2.0), settings) == pytest.approx(expected)


unit = st.floats(0.01, 0.99)
points = st.floats(0, 100)


@given(unit, unit, points, st.floats(0.001, 100), points)
def test_every_allowed_sparsity_ranks_above_every_sparsity_over_the_limit(
    allowed, over, headroom, excess, limit
):
    allowed_value = constrained_sparsity(allowed, limit - min(headroom, limit), limit)
    over_value = constrained_sparsity(over, limit + excess, limit)
    assert allowed_value == allowed
    assert over_value < 0 < allowed_value


@given(unit, unit, st.floats(0.001, 50), st.floats(0.001, 50))
def test_over_the_limit_the_smaller_excess_ranks_higher(first, second, excess, more):
    assert constrained_sparsity(first, 1 + excess, 1) > constrained_sparsity(
        second, 1 + excess + more, 1
    )


def test_pareto_returns_the_metrics_in_their_order(tiny):
    settings = tiny("search.objective=pareto", "search.metrics=[macs,accuracy,latency_p50_ms]")
    assert objective(record(accuracy=0.8, macs=2e6, p50=4.5), settings) == [2e6, 0.8, 4.5]
    # one metric: a single value, as a single-direction sweeper expects
    single = tiny("search.objective=pareto", "search.metrics=[latency_p90_ms]")
    assert objective(record(p50=4.0), single) == pytest.approx(4.4)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["search.objective=constrained_sparsity"],
        ["search.objective=pareto"],
    ],
)
def test_a_value_that_is_not_a_number_fails_the_trial(tiny, overrides):
    # NaN would abort an Optuna sweep (hydra-optuna-sweeper 1.3, optuna 2.10); FAILED fails
    # the one trial.
    nan_record = record(accuracy=math.nan, change=math.nan)
    assert objective(nan_record, tiny(*overrides)) is FAILED is None


def test_search_settings_are_checked_before_any_work(tiny):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="search.objective='best' is not allowed"):
        tiny("search.objective=best")
    with pytest.raises(ConfigError, match=r"search.max_accuracy_drop=-1.0 is not allowed"):
        tiny("search.max_accuracy_drop=-1")
    with pytest.raises(ConfigError, match=r"search.metrics\[1\]: Invalid value 'flops'"):
        tiny("search.metrics=[accuracy,flops]")


def composed_with_hydra(*overrides: str):
    """The config with Hydra's own node (sweeper, launcher), as a -m run composes it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return hydra_compose(CONFIG_NAME, list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    ("preset", "objective_name", "directions"),
    [
        ("search_sparsity", "constrained_sparsity", "maximize"),
        ("search_pareto", "pareto", ["maximize", "minimize"]),
    ],
)
def test_the_search_presets_compose(preset, objective_name, directions):
    cfg = composed_with_hydra(f"sweep={preset}")
    assert cfg.hydra.mode == RunMode.MULTIRUN  # a sweep without -m
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == cfg.seed  # a search repeats with the run's seed
    assert sweeper.direction == directions
    assert "interval" in sweeper.params.sparsity
    settings = settings_from(compose([f"sweep={preset}"]))
    assert settings.search.objective.value == objective_name
    if objective_name == "pareto":  # one direction per returned value, in the same order
        assert [m.value for m in settings.search.metrics] == ["accuracy", "macs"]
        assert len(settings.search.metrics) == len(directions)


def sweep_results(output_root: Path) -> tuple[dict, list[dict]]:
    """optimization_results.yaml of the one sweep under output_root, and its jobs' records."""
    (sweep_dir,) = output_root.glob("sweeps/*/*")
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    records = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/measurements.json"))]
    return results, records


def search(tmp_path: Path, *args: str):
    output_root = tmp_path / "outputs"
    # No -m: the presets run as sweeps (hydra.mode: MULTIRUN).
    result = run_cli(*args, *TINY, "tracking=none", f"paths.output_root={output_root}", cwd=ROOT)
    return result, output_root


@pytest.mark.slow
def test_search_sparsity_finds_the_highest_sparsity_within_the_drop(tmp_path):
    # On 32 test images (TINY) each image is 3.1 points: a limit of 0 allows the runs that
    # lose no image on balance.
    limit = 0.0
    result, output_root = search(
        tmp_path,
        "sweep=search_sparsity",
        "hydra.sweeper.n_trials=3",
        f"search.max_accuracy_drop={limit}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results, records = sweep_results(output_root)
    assert len(records) == 3
    drops = {r["config"]["sparsity"]: -r["accuracy_change"]["points"] for r in records}
    best = results["best_params"]["sparsity"]
    assert best in drops, (best, drops)
    allowed = [sparsity for sparsity, drop in drops.items() if drop <= limit]
    if allowed:
        assert drops[best] <= limit
        assert best == max(allowed)
        assert results["best_value"] == pytest.approx(best)
    else:  # no trial kept within the limit: the best is the one closest to it, below 0
        assert results["best_value"] == pytest.approx(-(min(drops.values()) - limit) / 100)
        assert results["best_value"] < 0


def dominates(a: list[float], b: list[float]) -> bool:
    """a is at least as accurate with no more MACs, and better in one of them."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


@pytest.mark.slow
def test_search_pareto_returns_the_non_dominated_trials(tmp_path):
    result, output_root = search(tmp_path, "sweep=search_pareto", "hydra.sweeper.n_trials=4")
    assert result.returncode == 0, result.stderr[-3000:]
    results, records = sweep_results(output_root)
    assert len(records) == 4
    front = [solution["values"] for solution in results["solutions"]]
    assert front, results
    assert not [(a, b) for a in front for b in front if dominates(a, b)]
    measured = [[r["pruned"]["accuracy"], r["pruned"]["macs"]] for r in records]
    expected = [p for p in measured if not any(dominates(q, p) for q in measured)]
    assert sorted(map(tuple, front)) == sorted(map(tuple, expected))
    for solution in results["solutions"]:
        assert set(solution["params"]) == {"sparsity", "pruner"}


@pytest.mark.slow
def test_a_failed_trial_is_failed_not_zero_and_the_search_goes_on(tmp_path):
    # With the preset's seed (1234), TPE's random start draws 1.5, 1.5, then 0.3 from these
    # two values; sparsity=1.5 fails its job's check.
    result, output_root = search(
        tmp_path,
        "sweep=search_sparsity",
        "sparsity=choice(0.3,1.5)",  # replaces the preset's interval
        "hydra.sweeper.n_trials=3",
        "search.max_accuracy_drop=100",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    failed = [line for line in output.splitlines() if "Failed experiment" in line]
    assert len(failed) == 2, output[-3000:]  # Optuna's FAIL, not a value
    assert result.stderr.count("error: sparsity=1.5 is not allowed") == 2
    results, records = sweep_results(output_root)
    assert len(records) == 1
    assert results["best_params"] == {"sparsity": 0.3}
    assert results["best_value"] == pytest.approx(0.3)
