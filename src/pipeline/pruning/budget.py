"""Pruning to a budget: the sparsity whose pruned model lands on a cost target (budget.macs,
budget.params or budget.latency, a ratio of the baseline's) instead of a sparsity given.

The cost of the pruned model falls as the sparsity rises, in steps (channel counts are whole
numbers, rounded to pruner.round_to). A bracketing search over the sparsity (find_sparsity)
finds one whose model costs at most the target, within the tolerance; the run then prunes at
that sparsity as it would at a given one.
Every probe, and the run's pruning after the search, starts from the random state the search
began with (the statistics batches, and the seeds): where the probes prune with the run's full
settings, the run's model is the probe's, and a budget run prunes exactly as `sparsity=` would.
Where rounded counts jump over the window [target - tolerance, target] (layers of one width
round alike, so they all lose a multiple at the same sparsity), the search is redone with half
the multiple, then with NNI's own counts, and the run prunes with the rounding that landed.
Where none lands, budget.fallback=nearest takes the probe nearest the target within the
tolerance on either side (the step above the window, where it is the nearer) instead of the
one below the window.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.config.schema import BudgetSettings, MeasureSettings, PrunerSettings, asked_budget
from pipeline.data.datasets import StageInputs
from pipeline.errors import ConfigError, EmptyLayerError
from pipeline.models.stats import count_macs, count_params
from pipeline.pruning.engine import TiedLayers
from pipeline.pruning.steps import prune_in_steps

log = logging.getLogger(__name__)

# Above this the activation pruners leave too few channels to rank (and NNI refuses 1.0).
MAX_SPARSITY = 0.95
# Names how find_sparsity searches. Results cached by sparsity-free settings (the recipe
# benchmark's rows) record it: change it with any change that moves where a search lands.
SEARCH_METHOD = "power-law interpolation in a bracket; 0.0005 without rounding"
# Probes of one search at most.
MAX_EVALUATIONS = 11
# A bracket this narrow ends the search: on MobileNetV2 one channel in 16 of its widest layer
# (1,280) is a sparsity step of 0.0125.
NARROW = 0.01
# With every layer's own count (no rounding) a step is one channel of the widest layer
# (1/1,280 on MobileNetV2): a bracket of 0.01 can still hold the window. NNI one-shot at MACs
# 0.5 probed 0.2455 -> 0.502 and 0.2504 -> 0.484 (every width a multiple of 8 loses a channel
# more at 0.25) and stopped outside the window; Torch-Pruning's quick-start 0.2865 -> 0.505 and
# 0.2947 -> 0.485 (recipe benchmark, tolerance 0.01).
NARROW_UNROUNDED = 0.0005


@dataclass
class BudgetSearch:
    kind: str  # macs | params | latency
    target: float  # the ratio asked for
    tolerance: float
    sparsity: float  # the smallest sparsity found whose model meets the target
    achieved: float  # that model's ratio, as the search measured it
    evaluations: list[dict] = field(default_factory=list)  # {sparsity, ratio}, in order
    round_to: int | None = None  # the rounding that landed (pruner.round_to or a finer one)
    fallback: str = "below"  # budget.fallback: the window the run is judged by (within_budget)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (
            f"budget.{self.kind}={self.target}: sparsity {self.sparsity:.4f} ({self.kind} ratio "
            f"{self.achieved:.4f}, {len(self.evaluations)} prunings, round_to {self.round_to})"
        )


def find_sparsity(
    ratio_at: Callable[[float], float | None],
    target: float,
    tolerance: float,
    key: str,
    narrow: float = NARROW,
) -> tuple[float, float, list[dict]]:
    """A sparsity in (0, MAX_SPARSITY] whose ratio lands in [target - tolerance / 2, target]
    (where the steps of whole channels allow; else the smallest one found at or below `target`),
    its ratio, and every evaluation. `ratio_at` returns None where pruning is impossible (it
    would empty a layer): too much, and never the answer. A bracket narrower than `narrow` ends
    the search (no step of the ratio worth a probe is left inside it).

    Each probe prunes a whole model, so probes are what costs. Channel pruning shrinks a layer's
    inputs and outputs together, so the ratio falls about as (1 - sparsity) ** p, p near 2 for
    MACs: the first probe takes p = 2, and later ones fit p through the probes that bracket the
    target (interpolation on log(1 - sparsity) against log(ratio)), aiming at the middle of the
    window. A probe is kept at least a tenth of the bracket away from its ends, so the bracket
    shrinks when the fit is poor (a noisy latency ratio); after two probes on one side the
    next halves the bracket. On the recipe benchmark's MobileNetV2 (MACs 0.7 / 0.5 / 0.35 /
    0.25) the default took 5 / 3 / 11 / 2 probes where halving the interval took 11 / 4 / 18 /
    7 (at 0.35 the 16-channel rounding jumps over the window, and the search is redone at 8),
    the reference 4 / 2 / 2 / 2 where halving took 7 / 9 / 4 / 6, and Torch-Pruning's ratio
    5 / 4 / 3 / 7 where halving took 11 / 7 / 6 / 18 (benchmarks/README.md). Those counts are
    from the 0.01 bracket; without rounding (`narrow=NARROW_UNROUNDED`) the search goes on inside
    it, and at MACs 0.5 the reference took 5 probes (to 0.49999), the quick-start 4 (to 0.498).
    """
    evaluations: list[dict] = []

    def evaluate(sparsity: float) -> float | None:
        ratio = ratio_at(sparsity)
        evaluations.append({"sparsity": sparsity, "ratio": ratio})
        log.info("budget search: sparsity %.4f -> %s ratio %s", sparsity, key, ratio)
        return ratio

    aim = target - tolerance / 4
    low, low_ratio = 0.0, 1.0  # the unpruned model: above the target, by the range check
    high: float | None = None  # the least sparsity known to meet the target (or to be too much)
    high_ratio: float | None = None
    best: tuple[float, float] | None = None
    moved_low: bool | None = None  # whether the last probe moved the low end
    sparsity = _next_probe(low, low_ratio, high, high_ratio, aim)  # p = 2 from the start
    for _ in range(MAX_EVALUATIONS):
        ratio = evaluate(sparsity)
        if ratio is not None and ratio > target:
            if sparsity >= MAX_SPARSITY:
                raise ConfigError(
                    f"{key}={target} cannot be reached: at sparsity {MAX_SPARSITY} the pruned "
                    f"model keeps {ratio:.3f} of the baseline's; allowed values: above {ratio:.3f}"
                )
            low, low_ratio = sparsity, ratio
        else:
            high, high_ratio = sparsity, ratio
            if ratio is not None:
                best = (sparsity, ratio)
        if best is not None and target - best[1] <= tolerance / 2:
            break
        # The ratios step with whole channels: where a step jumps over the window, a bracket
        # this narrow holds no other step worth a probe (a finer rounding may land instead).
        if high is not None and high - low < narrow:
            break
        moved_low_before, moved_low = moved_low, sparsity == low
        if high is not None and moved_low == moved_low_before:
            # One end moved twice running: interpolation creeps (a ratio near the target on
            # one side, a step far below it on the other); halve the bracket instead.
            sparsity = (low + high) / 2
        else:
            sparsity = _next_probe(low, low_ratio, high, high_ratio, aim)
    if best is None:
        raise ConfigError(
            f"{key}={target} cannot be reached: pruning empties a layer at every sparsity that "
            f"meets it; allowed values: a larger ratio"
        )
    return best[0], best[1], evaluations


def _next_probe(
    low: float, low_ratio: float, high: float | None, high_ratio: float | None, aim: float
) -> float:
    """The sparsity where the power law through the probes around `aim` reaches it, kept a tenth
    of the bracket inside it; without a probe at or below the target, the law through the
    unpruned model and the last probe above it (p = 2 before any probe), capped at
    MAX_SPARSITY."""
    if high is None:
        power = math.log(low_ratio) / math.log(1.0 - low) if low > 0 else 2.0
        if power <= 0:  # the probe kept the whole cost (rounding): no law to follow
            return (low + MAX_SPARSITY) / 2
        guess = 1.0 - aim ** (1.0 / power)
        return MAX_SPARSITY if guess >= MAX_SPARSITY or guess <= low else guess
    if high_ratio is None or high_ratio <= 0:  # too much: no ratio to fit through
        return (low + high) / 2
    margin = (high - low) / 10
    x_low, x_high = math.log(1.0 - low), math.log(1.0 - high)
    y_low, y_high = math.log(low_ratio), math.log(high_ratio)
    x = x_low + (math.log(aim) - y_low) * (x_high - x_low) / (y_high - y_low)
    return min(max(1.0 - math.exp(x), low + margin), high - margin)


def sparsity_for_budget(
    model: nn.Module,
    inputs: StageInputs,
    pruner: PrunerSettings,
    budget: BudgetSettings,
    measure: MeasureSettings,
) -> BudgetSearch | None:
    """find_sparsity over the sparsity with the pipeline's own pruning (pruner.iterations steps,
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
        # The window a run's budget is met in (within_budget): a finer rounding only where the
        # search landed outside it.
        if within_budget(kind, target, budget.tolerance, search.achieved):
            break
        # The last rounding's miss is the run's (the record says the budget was not met), unless
        # budget.fallback=nearest finds a probe within the tolerance above the target.
        (log.info if round_to is not None else log.warning)(
            "budget.%s=%s: with round_to=%s the model lands at %.4f, outside the tolerance %s",
            kind,
            target,
            round_to,
            search.achieved,
            budget.tolerance,
        )
    else:  # no rounding landed in the window
        if budget.fallback == "nearest":
            search = _nearest_landing(search, evaluations)
    replay()  # the run prunes from the state the search began with, as its probes did
    return dataclasses.replace(search, evaluations=evaluations, fallback=budget.fallback)


def _nearest_landing(search: BudgetSearch, evaluations: list[dict]) -> BudgetSearch:
    """`search` moved to the probe of any rounding nearest its target within the tolerance on
    either side (the nearer below where two are as near), or unchanged where none is: a step
    that jumps over [target - tolerance, target] from just above it (Torch-Pruning's
    quick-start at MACs 0.35: 0.3503 up to sparsity 0.4138, 0.3387 from 0.4139) lands the model
    0.0003 over its target instead of 0.0113 under it. Never reached for a latency budget: its
    search always ends at most the target, which is its whole window (within_budget), as a
    measured ratio is too noisy to be let over it."""
    landed = [
        entry
        for entry in evaluations
        if entry["ratio"] is not None and abs(entry["ratio"] - search.target) <= search.tolerance
    ]
    if not landed:
        return search
    nearest = min(landed, key=lambda e: (abs(e["ratio"] - search.target), e["ratio"]))
    log.warning(
        "budget.%s=%s: no model lands in [%.4f, %s]; budget.fallback=nearest takes %.4f "
        "(sparsity %.4f, round_to %s)",
        search.kind,
        search.target,
        search.target - search.tolerance,
        search.target,
        nearest["ratio"],
        nearest["sparsity"],
        nearest["round_to"],
    )
    return dataclasses.replace(
        search,
        sparsity=nearest["sparsity"],
        achieved=nearest["ratio"],
        round_to=nearest["round_to"],
    )


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
    # NNI allocates one total sparsity across layers by rank (Torch-Pruning too, with
    # global_pruning), so the statistics decide the counts and the search prunes as the run
    # will (and the run checks what it reached).
    cheap = (
        dataclasses.replace(
            pruner,
            training_steps=None if pruner.training_steps is None else 1,
            recalibration_batches=0,
        )
        if pruner.round_to and not pruner.global_pruning
        else pruner
    )
    shape = inputs.input_shape
    # Every evaluation prunes the same model: the engine's tied layers are traced once.
    tied: TiedLayers | None = None

    def ratio_at(sparsity: float) -> float | None:
        nonlocal tied
        replay()
        try:
            stepped = prune_in_steps(copy.deepcopy(model), inputs, cheap, sparsity, tied)
        except EmptyLayerError:  # a sparsity that leaves a layer no channel: too much
            return None
        tied = stepped.tied or tied
        pruned = stepped.model
        if kind == "latency":
            return _latency_ratio(model, pruned, inputs, measure)
        return _cost(pruned, kind, shape) / base_cost

    narrow = NARROW if pruner.round_to else NARROW_UNROUNDED
    sparsity, achieved, evaluations = find_sparsity(
        ratio_at, target, budget.tolerance, f"budget.{kind}", narrow
    )
    return BudgetSearch(
        kind, target, budget.tolerance, sparsity, achieved, evaluations, pruner.round_to
    )


def _cost(model: nn.Module, kind: str, shape: tuple[int, ...]) -> float:
    return float(count_macs(model, shape) if kind == "macs" else count_params(model))


def _latency_ratio(
    baseline: nn.Module, pruned: nn.Module, inputs: StageInputs, measure: MeasureSettings
) -> float:
    from pipeline.measure.uncertainty import latency_ratio
    from pipeline.stages.measure import measured_batch_sizes, timed_pair

    repeats = max(measure.rounds, measure.repeats // 4)
    # The batch size of the headline ratio the measure stage reports, which the budget is met on.
    batch = measured_batch_sizes(measure, inputs.device)[0]
    pair, _ = timed_pair(
        baseline, pruned, inputs.input_shape, inputs.device, measure, batch, repeats
    )
    return latency_ratio(pair.baseline_rounds, pair.pruned_rounds)["ratio"]


def within_budget(
    kind: str, target: float, tolerance: float, final: float, fallback: str = "below"
) -> bool:
    """Whether the final model meets its budget: at most the target, and for MACs and params no
    more than the tolerance below it (a model pruned far past its budget is not the one asked
    for, and recipes compared at a budget must be compared at one size); with
    budget.fallback=nearest, within the tolerance on either side. A measured latency ratio is
    too noisy for a window: at most the target."""
    if kind == "latency":
        return final <= target
    ceiling = target + tolerance if fallback == "nearest" else target
    return target - tolerance <= final <= ceiling


def achieved(kind: str, baseline: dict, pruned: dict, latency: dict) -> float:
    """The final model's ratio for the budget's kind, from the measure stage's figures."""
    if kind == "latency":
        return latency["ratio"]
    return pruned[kind] / baseline[kind]
