"""How sure a comparison is: the paired accuracy change of two models on the same test images,
and the latency ratio of two models timed in alternating rounds.

Both models see the same test images, so the comparison is paired: what matters is the images on
which they disagree, not each model's own spread. Latency is timed round by round, baseline and
pruned back to back, so that load which comes and goes hits both sides of a round alike.
"""

from __future__ import annotations

import base64
import math
import statistics
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def accuracy_change(
    baseline_correct: Sequence[bool],
    pruned_correct: Sequence[bool],
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict:
    """Pruned minus baseline top-1 accuracy in points, with a paired bootstrap interval over
    test images and McNemar's exact test on the images where exactly one model is right."""
    base = np.asarray(baseline_correct, dtype=bool)
    pruned = np.asarray(pruned_correct, dtype=bool)
    if base.shape != pruned.shape:
        raise ValueError(f"predictions on {base.size} and {pruned.size} images: not paired")
    count = base.size
    if count == 0:
        nan = math.nan
        return {"points": nan, "ci_low": nan, "ci_high": nan, "p_value": nan, "images": 0}
    difference = pruned.astype(np.int8) - base.astype(np.int8)  # -1, 0 or +1 per image
    if np.all(difference == difference[0]):
        # Every resample has the same mean; scipy warns and returns NaN for a degenerate sample.
        low = high = float(difference[0])
    else:
        interval = stats.bootstrap(
            (difference,),
            np.mean,
            n_resamples=resamples,
            batch=1000,  # keeps memory flat on large test sets
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        low, high = interval.low, interval.high
    only_baseline = int(np.sum(base & ~pruned))
    only_pruned = int(np.sum(pruned & ~base))
    return {
        "points": 100.0 * float(difference.mean()),
        "ci_low": 100.0 * float(low),
        "ci_high": 100.0 * float(high),
        "confidence": confidence,
        "only_baseline_right": only_baseline,
        "only_pruned_right": only_pruned,
        "p_value": mcnemar_exact(only_baseline, only_pruned),
        "images": count,
        "significant": bool(low > 0 or high < 0),
    }


def pack_outcomes(correct: Sequence[bool]) -> dict:
    """Per-image correctness as a compact record (one bit per image, base64): what a later
    paired comparison of two runs on the same test images needs (10,000 images: 1.7 kB)."""
    bits = np.packbits(np.asarray(correct, dtype=bool))
    return {"images": len(correct), "bits": base64.b64encode(bits.tobytes()).decode("ascii")}


def unpack_outcomes(packed: dict) -> np.ndarray:
    """pack_outcomes' per-image correctness, as a bool array."""
    raw = np.frombuffer(base64.b64decode(packed["bits"]), dtype=np.uint8)
    return np.unpackbits(raw, count=packed["images"]).astype(bool)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs at 1/2."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(only_first, discordant, 0.5).pvalue)


def latency_ratio(
    baseline_rounds: Sequence[Sequence[float]],
    pruned_rounds: Sequence[Sequence[float]],
    confidence: float = CONFIDENCE,
) -> dict:
    """The pruned/baseline latency ratio from alternating timing rounds.

    Each round gives one ratio of medians (its pruned calls over its baseline calls, timed back
    to back); the estimate is their geometric mean, with a t interval on the log ratios. Load
    that lasts a round slows both of its sides alike and cancels in the ratio; what it does not
    cancel widens the interval instead of moving the estimate.
    """
    logs = [
        math.log(statistics.median(pruned) / statistics.median(base))
        for base, pruned in zip(baseline_rounds, pruned_rounds, strict=True)
    ]
    mean = statistics.fmean(logs)
    if len(logs) > 1:
        spread = statistics.stdev(logs) / math.sqrt(len(logs))
        half = float(stats.t.ppf(0.5 + confidence / 2.0, len(logs) - 1)) * spread
    else:
        half = math.inf
    low, high = math.exp(mean - half), math.exp(mean + half)
    return {
        "ratio": math.exp(mean),
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "rounds": len(logs),
        "round_ratios": [math.exp(value) for value in logs],
        "measurable": bool(high < 1.0 or low > 1.0),
    }
