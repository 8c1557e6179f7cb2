"""Pruning to a budget: the sparsity whose pruned model lands on a cost target (budget.macs,
budget.params or budget.latency, a ratio of the baseline's) instead of a sparsity given.

The cost of the pruned model falls as the sparsity rises, in steps (channel counts are whole
numbers, rounded to pruner.round_to). Bisection over the sparsity finds the smallest one whose
model costs at most the target; the run then prunes at that sparsity as it would at a given one.
Every probe, and the run's pruning after the search, starts from the random state the search
began with (the statistics batches, and the seeds): where the probes prune with the run's full
settings, the run's model is the probe's, and a budget run prunes exactly as `sparsity=` would.
Where rounded counts jump over the window [target - tolerance, target] (layers of one width
round alike, so they all lose a multiple at the same sparsity), the search is redone with half
the multiple, then with NNI's own counts, and the run prunes with the rounding that landed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.config import asked_budget
from pipeline.data import StageInputs
from pipeline.errors import ConfigError
from pipeline.model_stats import count_macs, count_params
from pipeline.nni_adapter import LayerDependencies
from pipeline.schema import BudgetSettings, MeasureSettings, PrunerSettings
from pipeline.stages.iterative import prune_in_steps

log = logging.getLogger(__name__)

# Above this the activation pruners leave too few channels to rank (and NNI refuses 1.0).
MAX_SPARSITY = 0.95
# Halvings of the sparsity interval: 0.95 / 2**10 < 0.001, far below one rounded channel.
MAX_EVALUATIONS = 10


@dataclass
class BudgetSearch:
    kind: str  # macs | params | latency
    target: float  # the ratio asked for
    tolerance: float
    sparsity: float  # the smallest sparsity found whose model meets the target
    achieved: float  # that model's ratio, as the search measured it
    evaluations: list[dict] = field(default_factory=list)  # {sparsity, ratio}, in order
    round_to: int | None = None  # the rounding that landed (pruner.round_to or a finer one)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def bisect(
    ratio_at: Callable[[float], float | None], target: float, tolerance: float, key: str
) -> tuple[float, float, list[dict]]:
    """The smallest sparsity in (0, MAX_SPARSITY] whose ratio is at most `target` (to within the
    step of the search), its ratio, and every evaluation; stops early once a sparsity lands in
    [target - tolerance / 2, target]. `ratio_at` returns None where pruning is impossible (it
    would empty a layer): too much, and never the answer."""
    evaluations: list[dict] = []

    def evaluate(sparsity: float) -> float | None:
        ratio = ratio_at(sparsity)
        evaluations.append({"sparsity": sparsity, "ratio": ratio})
        log.info("budget search: sparsity %.4f -> %s ratio %s", sparsity, key, ratio)
        return ratio

    best: tuple[float, float] | None = None
    most = evaluate(MAX_SPARSITY)
    if most is not None and most > target:
        raise ConfigError(
            f"{key}={target} cannot be reached: at sparsity {MAX_SPARSITY} the pruned model "
            f"keeps {most:.3f} of the baseline's; allowed values: above {most:.3f}"
        )
    if most is not None:
        best = (MAX_SPARSITY, most)
    low, high = 0.0, MAX_SPARSITY
    for _ in range(MAX_EVALUATIONS):
        if best is not None and target - best[1] <= tolerance / 2:
            break
        middle = (low + high) / 2
        ratio = evaluate(middle)
        if ratio is None or ratio <= target:
            high = middle
            if ratio is not None:
                best = (middle, ratio)
        else:
            low = middle
    if best is None:
        raise ConfigError(
            f"{key}={target} cannot be reached: pruning empties a layer at every sparsity that "
            f"meets it; allowed values: a larger ratio"
        )
    return best[0], best[1], evaluations


def sparsity_for_budget(
    model: nn.Module,
    inputs: StageInputs,
    pruner: PrunerSettings,
    budget: BudgetSettings,
    measure: MeasureSettings,
) -> BudgetSearch | None:
    """Bisection over the sparsity with the pipeline's own pruning (pruner.iterations steps,
    the same rounding) on copies of `model`. The counts of channels each step keeps follow from
    the config list, not from which channels rank lowest (with pruner.round_to), so the search
    ranks on one batch and skips the BatchNorm re-estimation: MACs and params come out as the
    full pruning's. Without round_to it prunes with the full settings. A latency
    budget times each candidate against the baseline as the measure stage does, with a quarter
    of measure.repeats."""
    found = asked_budget(budget)
    if found is None:
        return None
    kind, target = found
    base_cost = _cost(model, kind, inputs.input_shape)
    replay = _random_state_replay(inputs)
    evaluations = []
    for round_to in _roundings(pruner.round_to):
        rounded = dataclasses.replace(pruner, round_to=round_to)
        search = _search(model, inputs, rounded, kind, target, budget, measure, base_cost, replay)
        evaluations += [entry | {"round_to": round_to} for entry in search.evaluations]
        # A latency budget asks for at most the target only: measured ratios are too noisy
        # for a window.
        if kind == "latency" or target - search.achieved <= budget.tolerance:
            break
        log.info(
            "budget.%s=%s: with round_to=%s the model lands at %.4f, outside the tolerance %s",
            kind,
            target,
            round_to,
            search.achieved,
            budget.tolerance,
        )
    replay()  # the run prunes from the state the search began with, as its probes did
    return dataclasses.replace(search, evaluations=evaluations)


def _random_state_replay(inputs: StageInputs) -> Callable[[], None]:
    """A function that puts back the random state as it is now: the training loader's
    generator (which batches feed the statistics) and the global generators. Without it each
    probe ranks on other batches than the last, and the run's pruning at the sparsity found
    can land on other channel counts than its probe (one-shot NNI at MACs 0.25: probe 0.2495,
    the run 0.2502, over the target)."""
    # A DataLoader (or FirstBatches) has one; None where the order is not drawn.
    generator = getattr(inputs.loaders.train, "generator", None)
    loader_state = None if generator is None else generator.get_state()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def replay() -> None:
        if generator is not None:
            generator.set_state(loader_state)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)

    return replay


def _roundings(round_to: int | None) -> list[int | None]:
    """pruner.round_to, then half of it, then NNI's own counts."""
    if not round_to:
        return [None]
    return list(dict.fromkeys([round_to, *([round_to // 2] if round_to > 1 else []), None]))


def _search(
    model: nn.Module,
    inputs: StageInputs,
    pruner: PrunerSettings,
    kind: str,
    target: float,
    budget: BudgetSettings,
    measure: MeasureSettings,
    base_cost: float,
    replay: Callable[[], None],
) -> BudgetSearch:
    # With pruner.round_to every layer's count follows from the config list alone; without it
    # NNI allocates one total sparsity across layers by rank, so the statistics decide the
    # counts and the search prunes as the run will (and the run checks what it reached).
    cheap = (
        dataclasses.replace(pruner, training_steps=1, recalibration_batches=0)
        if pruner.round_to
        else pruner
    )
    shape = inputs.input_shape
    # Every evaluation prunes the same model: NNI's layer dependencies are traced once.
    dependencies: LayerDependencies | None = None

    def ratio_at(sparsity: float) -> float | None:
        nonlocal dependencies
        replay()
        try:
            stepped = prune_in_steps(
                copy.deepcopy(model), inputs, cheap, sparsity, dependencies=dependencies
            )
        except Exception as error:
            # NNI refuses a sparsity that leaves a layer no channel (its EmptyLayerError).
            if type(error).__name__ == "EmptyLayerError":
                return None
            raise
        dependencies = stepped.dependencies or dependencies
        pruned = stepped.model
        if kind == "latency":
            return _latency_ratio(model, pruned, inputs, measure)
        return _cost(pruned, kind, shape) / base_cost

    sparsity, achieved, evaluations = bisect(ratio_at, target, budget.tolerance, f"budget.{kind}")
    return BudgetSearch(
        kind, target, budget.tolerance, sparsity, achieved, evaluations, pruner.round_to
    )


def _cost(model: nn.Module, kind: str, shape: tuple[int, ...]) -> float:
    return float(count_macs(model, shape) if kind == "macs" else count_params(model))


def _latency_ratio(
    baseline: nn.Module, pruned: nn.Module, inputs: StageInputs, measure: MeasureSettings
) -> float:
    from pipeline.stages.measure import timed_pair
    from pipeline.uncertainty import latency_ratio

    repeats = max(measure.rounds, measure.repeats // 4)
    pair = timed_pair(baseline, pruned, inputs.input_shape, inputs.device, measure, 1, repeats)
    return latency_ratio(pair.baseline_rounds, pair.pruned_rounds)["ratio"]


def achieved(kind: str, baseline: dict, pruned: dict, latency: dict) -> float:
    """The final model's ratio for the budget's kind, from the measure stage's figures."""
    if kind == "latency":
        return latency["ratio"]
    return pruned[kind] / baseline[kind]
