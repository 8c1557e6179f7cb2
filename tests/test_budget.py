"""Pruning to a budget (budget.macs / budget.params / budget.latency) instead of a sparsity."""

from __future__ import annotations

import pytest

from pipeline.checks.settings import settings_from
from pipeline.checks.sweep_plan import check_command_line
from pipeline.config.compose import compose
from pipeline.errors import ConfigError
from pipeline.pruning.budget import (
    MAX_SPARSITY,
    NARROW,
    NARROW_UNROUNDED,
    find_sparsity,
    within_budget,
)
from pipeline.run import run


def stepped_cost(sparsity: float) -> float:
    """Like a real model's MACs ratio: falling with the sparsity, in steps of whole channels."""
    kept = 1.0 - sparsity
    return round(kept**1.6 * 64) / 64


@pytest.mark.parametrize("target", [0.7, 0.5, 0.35, 0.25, 0.1])
@pytest.mark.parametrize("power", [1.0, 1.6, 2.4])
def test_the_search_lands_at_or_below_the_target_within_the_tolerance(target, power):
    def cost(sparsity: float) -> float:
        return round((1.0 - sparsity) ** power * 64) / 64

    sparsity, ratio, evaluations = find_sparsity(cost, target, 0.02, "budget.macs")
    assert target - 0.02 <= ratio <= target
    assert ratio == cost(sparsity)
    # Fewer probes than halving the interval took (7 to 10 for these).
    assert len(evaluations) <= 5


def test_a_noisy_ratio_still_ends_at_or_below_the_target():
    """A latency ratio is not monotone to the last digit: the search keeps shrinking its
    bracket and returns a probe that met the target."""
    wobble = iter([0.03, -0.04, 0.02, -0.01, 0.05, -0.03, 0.01, 0.0, 0.02, -0.02, 0.01] * 2)

    def noisy(sparsity: float) -> float:
        return 0.3 + 0.6 * (1.0 - sparsity) + next(wobble)

    sparsity, ratio, evaluations = find_sparsity(noisy, 0.6, 0.02, "budget.latency")
    assert ratio <= 0.6 and len(evaluations) <= 11
    assert {"sparsity": sparsity, "ratio": ratio} in evaluations


def nni_like_cost(sparsity: float) -> float:
    """NNI's one-shot counts on MobileNetV2 at MACs 0.5 (the recipe benchmark's reference): a
    ratio falling by one channel of a wide layer at a time, and every narrow width (a multiple
    of 8) losing a channel more at 0.25 at once, a drop of 0.017."""
    # Through the probes the reference's search made: 0.2455 -> 0.5017, 0.2504 -> 0.4844,
    # 0.2947 -> 0.4210; the window [0.49, 0.5] holds sparsities 0.2474 to 0.25 only.
    ratio = (
        0.5017 - 0.9 * (sparsity - 0.2455)
        if sparsity < 0.25
        else 0.4844 - 1.43 * (sparsity - 0.2504)
    )
    return round(ratio * 1280) / 1280


def test_without_rounding_the_search_narrows_past_a_jump_into_the_window():
    # The window [0.49, 0.5] lies just below the jump, in a bracket narrower than NARROW: the
    # search stopped there at 0.484 before it narrowed finer with every layer's own counts.
    sparsity, ratio, evaluations = find_sparsity(
        nni_like_cost, 0.5, 0.01, "budget.macs", NARROW_UNROUNDED
    )
    assert 0.49 <= ratio <= 0.5 and sparsity < 0.25
    assert len(evaluations) <= 11
    _, coarse, _ = find_sparsity(nni_like_cost, 0.5, 0.01, "budget.macs", NARROW)
    assert coarse < 0.49  # what the rounded search's bracket allows: the reason for the finer one


@pytest.mark.parametrize(
    ("kind", "final", "met"),
    [
        ("macs", 0.4950, True),
        ("macs", 0.5000, True),
        ("macs", 0.5003, False),  # over the budget
        ("macs", 0.4887, False),  # pruned past the window: not the model asked for
        ("params", 0.4899, False),
        ("latency", 0.30, True),  # a noisy measured ratio: at most the target only
        ("latency", 0.51, False),
    ],
)
def test_a_budget_is_met_only_within_its_window(kind, final, met):
    assert within_budget(kind, 0.5, 0.01, final) is met


@pytest.mark.parametrize(
    ("kind", "final", "met"),
    [
        ("macs", 0.4950, True),
        ("macs", 0.5003, True),  # the nearest landing, over the target by less than the window
        ("params", 0.5100, True),
        ("macs", 0.5101, False),
        ("macs", 0.4899, False),
        ("latency", 0.5003, False),  # measured: never let over its target
    ],
)
def test_with_the_nearest_fallback_a_budget_is_met_within_the_window_on_either_side(
    kind, final, met
):
    assert within_budget(kind, 0.5, 0.01, final, "nearest") is met


# Torch-Pruning's quick-start at MACs 0.35 on the recipe benchmark's trained MobileNetV2, with
# every layer's own count: one step from 0.3503 (sparsity up to 0.4138) to 0.3387 (0.4139).
QUICK_START_PROBES = [(0.4020, 0.3621), (0.4138, 0.3503), (0.4139, 0.3387), (0.4216, 0.3312)]


@pytest.mark.parametrize(
    ("fallback", "kind", "sparsity", "ratio"),
    [
        ("below", "macs", 0.4139, 0.3387),  # the ceiling kept: 0.0113 under it
        ("nearest", "macs", 0.4138, 0.3503),  # 0.0003 over it: the nearer
        ("nearest", "latency", 0.4139, 0.3387),  # a measured ratio stays under its target
    ],
)
def test_where_a_step_jumps_over_the_window_the_fallback_picks_the_model(
    tiny, monkeypatch, fallback, kind, sparsity, ratio
):
    import torch

    from conftest import digits_inputs
    from pipeline.pruning import budget as budget_module

    def search_with_the_jump(model, inputs, pruner, kind, target, budget, *rest):
        evaluations = [{"sparsity": s, "ratio": r} for s, r in QUICK_START_PROBES]
        below = min((e for e in evaluations if e["ratio"] <= target), key=lambda e: e["sparsity"])
        return budget_module.BudgetSearch(
            kind, target, budget.tolerance, below["sparsity"], below["ratio"], evaluations
        )

    monkeypatch.setattr(budget_module, "_search", search_with_the_jump)
    settings = tiny(
        f"budget.{kind}=0.35",
        "budget.tolerance=0.01",
        f"budget.fallback={fallback}",
        "pruner.round_to=null",
    )
    search = budget_module.sparsity_for_budget(
        torch.nn.Conv2d(3, 2, 1),  # only its cost is read: _search is the stand-in
        digits_inputs(max_batches=1),
        settings.pruner,
        settings.budget,
        settings.measure,
    )
    assert (search.sparsity, search.achieved) == (sparsity, ratio)
    assert search.fallback == fallback and search.round_to is None
    assert len(search.evaluations) == len(QUICK_START_PROBES)
    met = within_budget(kind, 0.35, 0.01, search.achieved, search.fallback)
    # Latency: at most its target, whatever the fallback; MACs: 0.3387 is outside the window.
    assert met is (fallback == "nearest" or kind == "latency")


def test_a_fallback_outside_its_choices_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"^budget.fallback='over' is not allowed; allowed values: below, nearest$",
    ):
        settings_from(compose(["budget.fallback=over"]))


def test_a_target_below_the_most_pruned_model_is_refused():
    with pytest.raises(ConfigError, match=r"budget.macs=0.01 cannot be reached"):
        find_sparsity(lambda s: 0.2 + 0.8 * (1 - s), 0.01, 0.02, "budget.macs")
    assert MAX_SPARSITY < 1


def test_budget_and_sparsity_on_one_command_line_are_refused():
    with pytest.raises(ConfigError, match=r"^budget.macs=0.5 replaces sparsity"):
        check_command_line(["budget.macs=0.5", "sparsity=0.3"])


def test_two_budgets_at_once_are_refused():
    with pytest.raises(ConfigError, match=r"one budget at a time"):
        settings_from(compose(["budget.macs=0.5", "budget.params=0.3"]))


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_budget_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match=r"^budget.params=.* is not allowed"):
        settings_from(compose([f"budget.params={value}"]))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "target"), [("macs", 0.5), ("params", 0.3)])
def test_a_run_lands_on_its_budget(tiny, tmp_path, kind, target):
    record = run(tiny(f"budget.{kind}={target}", "tracking=none"), tmp_path / "run")
    budget = record["pruning"]["budget"]
    reached = record["pruned"][kind] / record["baseline"][kind]
    assert budget["final"] == pytest.approx(reached)
    assert target - 0.02 <= reached <= target
    assert budget["met"] and record["pruning"]["sparsity"] == budget["sparsity"]


def test_sparsities_that_empty_a_layer_count_as_too_much_and_are_never_the_answer():
    # NNI's one-shot allocation (pruner.round_to=null) empties a layer at high sparsities.
    def ratio_at(sparsity: float) -> float | None:
        return None if sparsity > 0.8 else stepped_cost(sparsity)

    sparsity, ratio, evaluations = find_sparsity(ratio_at, 0.25, 0.02, "budget.macs")
    assert 0.23 <= ratio <= 0.25 and sparsity <= 0.8
    assert len(evaluations) <= 5


def test_a_layer_emptied_above_the_target_narrows_the_search():
    # Slow to fall at first, so the power law overshoots into sparsities that empty a layer
    # (above 0.75); the target needs 0.707 or more.
    def ratio_at(sparsity: float) -> float | None:
        return None if sparsity > 0.75 else 1.0 - sparsity**2

    sparsity, ratio, evaluations = find_sparsity(ratio_at, 0.5, 0.02, "budget.macs")
    assert 0.48 <= ratio <= 0.5 and sparsity <= 0.75
    assert any(entry["ratio"] is None for entry in evaluations)


@pytest.mark.slow
def test_a_rounding_that_jumps_over_the_window_is_refined(tiny):
    """Layers of one width round alike, so a round_to of 16 can jump from above the target to
    far below it; the search halves the multiple and reports the rounding that landed. On the
    digits MobileNetV2 at MACs 0.37, channels in 16s land at 0.334 or 0.416 and no closer; in
    8s the search lands in the window."""
    import torch

    from conftest import digits_inputs
    from pipeline.models.zoo import mobilenet_v2
    from pipeline.pruning.budget import sparsity_for_budget

    settings = tiny("budget.macs=0.37", "pruner.round_to=16", "pruner.training_steps=1")
    torch.manual_seed(0)
    search = sparsity_for_budget(
        mobilenet_v2(num_classes=10).eval(),
        digits_inputs(seed=0, max_batches=2),
        settings.pruner,
        settings.budget,
        settings.measure,
    )
    assert 0.35 <= search.achieved <= 0.37
    assert search.round_to == 8
    coarse = [e["ratio"] for e in search.evaluations if e["round_to"] == 16]
    assert coarse and not any(0.35 <= ratio <= 0.37 for ratio in coarse)


@pytest.mark.slow
def test_a_budget_run_prunes_exactly_as_its_sparsity_would_and_lands_where_its_probe_did(tiny):
    """Without round_to the statistics decide the channel counts: each probe, and the run's
    pruning after the search, rank on the same batches, so the run's model is the probe's
    (one-shot NNI at MACs 0.25 once landed at 0.2502 after a probe at 0.2495)."""
    import torch

    from conftest import digits_inputs
    from pipeline.models.stats import count_macs
    from pipeline.models.zoo import mobilenet_v2
    from pipeline.pruning.budget import sparsity_for_budget
    from pipeline.pruning.steps import prune_in_steps

    settings = tiny("budget.macs=0.5", "pruner.round_to=null", "pruner.iterations=1")
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10).eval()

    def searched_then_pruned():
        inputs = digits_inputs(seed=0)
        torch.manual_seed(1)
        search = sparsity_for_budget(
            model, inputs, settings.pruner, settings.budget, settings.measure
        )
        return search, prune_in_steps(model, inputs, settings.pruner, search.sparsity)

    def pruned_at(sparsity: float):
        inputs = digits_inputs(seed=0)
        torch.manual_seed(1)
        return prune_in_steps(model, inputs, settings.pruner, sparsity)

    found, after_search = searched_then_pruned()
    alone = pruned_at(found.sparsity)
    shape = (3, 32, 32)
    macs = count_macs(after_search.model, shape) / count_macs(model, shape)
    assert macs == pytest.approx(found.achieved, abs=1e-12)
    assert 0.48 <= macs <= 0.5
    assert len(found.evaluations) > 1  # the probes drew batches between
    first, second = after_search.masks_by_step[0], alone.masks_by_step[0]
    assert first.keys() == second.keys()
    for name in first:
        for kind in first[name]:
            assert torch.equal(first[name][kind], second[name][kind]), (name, kind)


@pytest.mark.parametrize(
    ("fallback", "final", "met", "line"),
    [
        (
            "nearest",
            0.3503,
            True,
            "budget: macs within [0.34, 0.36] of the baseline's, met: 0.3503 (sparsity 0.4138, "
            "found in 4 prunings); over 0.35: no whole-channel step lands in [0.34, 0.35], "
            "budget.fallback=nearest took the nearest",
        ),
        (
            "below",
            0.3387,
            False,
            "budget: macs within [0.34, 0.35] of the baseline's, NOT met: 0.3387 (sparsity "
            "0.4139, found in 4 prunings)",
        ),
        (
            None,  # a record from before budget.fallback
            0.3450,
            True,
            "budget: macs within [0.34, 0.35] of the baseline's, met: 0.3450 (sparsity 0.4139, "
            "found in 4 prunings)",
        ),
    ],
)
def test_the_summary_says_where_the_budget_landed_and_why_over_it(fallback, final, met, line):
    from pipeline.report.console import budget_line

    budget = {
        "kind": "macs",
        "target": 0.35,
        "tolerance": 0.01,
        "sparsity": 0.4138 if final > 0.35 else 0.4139,
        "final": final,
        "met": met,
        "evaluations": [{"sparsity": s, "ratio": r} for s, r in QUICK_START_PROBES],
    } | ({"fallback": fallback} if fallback else {})
    assert budget_line(budget) == line
