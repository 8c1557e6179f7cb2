"""The uncertainty of a comparison: paired accuracy intervals, latency ratio intervals, and
what the summary table says about them."""

import numpy as np
import pytest

from pipeline.measure.uncertainty import accuracy_change, latency_ratio, mcnemar_exact
from pipeline.report import accuracy_cell, latency_cell
from pipeline.training.convergence import check_convergence


def predictions(images: int, only_baseline: int, only_pruned: int, both_wrong: int = 0):
    """Right/wrong per image for two models that disagree on a known number of images."""
    base, pruned = [True] * images, [True] * images
    for index in range(only_baseline):
        pruned[index] = False
    for index in range(only_baseline, only_baseline + only_pruned):
        base[index] = False
    for index in range(images - both_wrong, images):
        base[index] = pruned[index] = False
    return base, pruned


def test_a_clear_loss_has_an_interval_below_zero():
    base, pruned = predictions(400, only_baseline=40, only_pruned=0)
    change = accuracy_change(base, pruned)
    assert change["points"] == pytest.approx(-10.0)
    # The normal approximation gives -10 +- 2.94 points.
    assert -13.6 < change["ci_low"] < -12.3 and -7.7 < change["ci_high"] < -6.4
    assert change["significant"] and change["p_value"] < 1e-9
    assert (change["only_baseline_right"], change["only_pruned_right"]) == (40, 0)
    assert accuracy_cell(change).startswith("-10.00 pts [")
    assert "not significant" not in accuracy_cell(change)


def test_a_small_gap_on_few_images_is_not_significant():
    # 360 test images (digits): the pruned model right on 7 more, wrong on 3 more: +1.11 points.
    base, pruned = predictions(360, only_baseline=3, only_pruned=7, both_wrong=10)
    change = accuracy_change(base, pruned)
    assert change["points"] == pytest.approx(100 * 4 / 360)
    assert change["ci_low"] < 0 < change["ci_high"]
    assert not change["significant"]
    assert change["p_value"] == pytest.approx(mcnemar_exact(3, 7)) and change["p_value"] > 0.3
    assert accuracy_cell(change).endswith(", not significant")


def test_mcnemar_matches_the_binomial_test():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 2 * 0.5**6
    assert mcnemar_exact(5, 5) == 1.0


def test_unpaired_predictions_are_refused():
    with pytest.raises(ValueError, match="not paired"):
        accuracy_change([True, False], [True])


def test_latency_ratio_and_its_interval():
    base = [[10.0, 10.2, 9.9]] * 6
    pruned = [[7.0, 7.1, 6.9], [7.2, 7.0, 7.1]] * 3
    ratio = latency_ratio(base, pruned)
    assert ratio["ratio"] == pytest.approx(0.705, abs=0.01)
    assert ratio["ci_low"] < ratio["ratio"] < ratio["ci_high"] < 1.0
    assert ratio["measurable"] and ratio["rounds"] == 6


def test_load_that_hits_both_sides_of_a_round_cancels():
    # Rounds 3 and 4 ran ten times slower (another process took the cores): both sides alike.
    slow = {2, 3}
    base = [[100.0 if r in slow else 10.0] * 3 for r in range(6)]
    pruned = [[80.0 if r in slow else 8.0] * 3 for r in range(6)]
    ratio = latency_ratio(base, pruned)
    assert ratio["ratio"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("value", "low", "high", "expected"),
    [
        (1.401, 1.30, 1.50, "+40.1% [+30.0%, +50.0%]"),  # slower: a plus sign
        (0.880, 0.85, 0.91, "-12.0% [-15.0%, -9.0%]"),  # faster: a minus sign
        (0.990, 0.95, 1.03, "-1.0% [-5.0%, +3.0%], no measurable difference"),
    ],
)
def test_the_latency_change_has_the_right_sign(value, low, high, expected):
    ratio = {"ratio": value, "ci_low": low, "ci_high": high, "measurable": not low <= 1 <= high}
    assert latency_cell(ratio) == expected


def test_convergence_rule():
    rising = [{"val_accuracy": a} for a in (0.5, 0.7, 0.8, 0.85, 0.9, 0.95)]
    flat = [{"val_accuracy": a} for a in (0.5, 0.9, 0.95, 0.955, 0.95, 0.952)]
    assert not check_convergence(rising, window=3, tolerance=0.01).converged
    verdict = check_convergence(flat, window=3, tolerance=0.01)
    assert verdict.converged and verdict.late_gain == pytest.approx(0.005)
    short = check_convergence(rising[:2], window=3, tolerance=0.01)
    assert not short.converged and "2 epoch(s)" in short.reason


def test_mcnemar_on_a_large_test_set_does_not_overflow():
    # 2.0 ** 1100 overflows a float: a 10,000-image test set reaches that many discordant images.
    assert mcnemar_exact(600, 500) == pytest.approx(0.0028195, rel=1e-4)  # scipy's binomtest
    assert 0.0 < mcnemar_exact(3000, 1000) < 1e-200


def test_per_image_outcomes_pack_to_a_bit_each_and_back():
    from pipeline.measure.uncertainty import pack_outcomes, unpack_outcomes

    rng = np.random.default_rng(0)
    for count in (0, 1, 7, 8, 9, 10_000):
        correct = (rng.random(count) < 0.9).tolist()
        packed = pack_outcomes(correct)
        assert packed["images"] == count
        assert len(packed["bits"]) <= 4 * ((count + 7) // 8 + 2) / 3 + 4  # base64 of the bits
        assert unpack_outcomes(packed).tolist() == correct
