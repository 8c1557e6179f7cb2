"""What a job hands back to a Hydra sweeper: the value, or values, it optimises, computed from
the run's record (what measurements.json holds) and its `search` settings.

    search.objective=accuracy               the pruned model's test accuracy (the default)
    search.objective=constrained_sparsity   sweep=search_sparsity: the highest allowed sparsity
    search.objective=pareto                 sweep=search_pareto: one value per search.metrics

A job that fails, or whose value is not a number, returns FAILED (None). hydra-optuna-sweeper
1.3 cannot take a NaN: optuna 2.10 refuses it in `tell`, and the sweeper's second `tell`, which
would mark the trial failed, passes the NaN again and aborts the whole sweep. None is not a
number, so the sweeper marks that one trial FAIL and goes on; other sweepers ignore it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline.config.schema import DropEstimate, Metric, Objective, RunSettings

FAILED = None


def objective(record: Mapping[str, Any], settings: RunSettings) -> float | list[float] | None:
    """The value(s) a sweeper optimises for this run: one float, a list of floats in the order
    of search.metrics, or FAILED when one of them is not a number."""
    search = settings.search
    if search.objective is Objective.accuracy:
        values = [record["pruned"]["accuracy"]]
    elif search.objective is Objective.constrained_sparsity:
        drop = accuracy_drop(record["accuracy_change"], search.drop_estimate)
        values = [constrained_sparsity(settings.sparsity, drop, search.max_accuracy_drop)]
    else:
        values = [metric(record["pruned"], name) for name in search.metrics]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return FAILED
    return [float(v) for v in values] if len(values) > 1 else float(values[0])


def record_objective(record: Mapping[str, Any]) -> float | list[float] | None:
    """objective() from a record alone, with the search settings the record's job ran with:
    how a sweep's end ranks its jobs, whichever process ran them."""
    from types import SimpleNamespace

    config = record["config"]
    search = config["search"]
    settings = SimpleNamespace(
        sparsity=config["sparsity"],
        search=SimpleNamespace(
            objective=Objective(search["objective"]),
            drop_estimate=DropEstimate(search["drop_estimate"]),
            max_accuracy_drop=search["max_accuracy_drop"],
            metrics=[Metric(name) for name in search["metrics"]],
        ),
    )
    return objective(record, settings)


def best_job(outcomes: list) -> Any | None:
    """The job (a JobOutcome that ran or was found finished) with the highest objective; None
    when no job has one, or when the objective has several values (a Pareto search has a
    front, not one best)."""
    scored = []
    for outcome in outcomes:
        if outcome.failed or outcome.record is None:
            continue
        try:
            value = record_objective(outcome.record)
        except (KeyError, TypeError, ValueError):  # a record of an older layout
            continue
        if isinstance(value, list):
            return None
        if value is not None:
            scored.append((value, outcome))
    return max(scored, key=lambda pair: pair[0])[1] if scored else None


def accuracy_drop(change: Mapping[str, float], estimate: DropEstimate) -> float:
    """Points of top-1 accuracy lost against the baseline, from the paired accuracy change
    (pruned minus baseline): the measured drop, or the upper end of its 95 % interval."""
    if estimate is DropEstimate.upper:
        return -change["ci_low"]
    return -change["points"]


def constrained_sparsity(sparsity: float, drop: float, max_drop: float) -> float:
    """`sparsity` (in (0, 1)) when the drop is at most `max_drop` points; otherwise minus the
    excess drop as a fraction (< 0). Every allowed run thus ranks above every run over the
    limit, and among those over it, the one closest to the limit ranks highest, which steers
    the sampler back towards allowed sparsities."""
    excess = drop - max_drop
    if math.isnan(excess):
        return math.nan
    return sparsity if excess <= 0 else -excess / 100.0


def metric(pruned: Mapping[str, Any], name: Metric) -> float:
    """One measured value of the pruned model (a `pruned` object of measurements.json)."""
    if name is Metric.latency_p50_ms:
        return pruned["latency_ms"]["p50"]
    if name is Metric.latency_p90_ms:
        return pruned["latency_ms"]["p90"]
    return pruned[name.value]
