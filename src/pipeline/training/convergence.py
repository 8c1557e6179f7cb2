"""Had training stopped improving? A baseline that was still learning when it stopped makes the
pruned model's accuracy change partly a training effect: fine-tuning simply continues it.

The rule (baseline.convergence in conf/config.yaml): training has converged when the best
validation accuracy of the last `window` epochs beats the best of all the epochs before them by
at most `tolerance` (a fraction: 0.01 is one point). A run of `window` epochs or fewer has nothing
to compare with and counts as not converged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Convergence:
    converged: bool
    late_gain: float | None  # best val accuracy of the last `window` epochs minus the best before
    window: int
    tolerance: float
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def check_convergence(history: list[dict], window: int, tolerance: float) -> Convergence:
    """Apply the rule above to a training history of {epoch, val_accuracy, ...} rows."""
    accuracies = [row["val_accuracy"] for row in history]
    if len(accuracies) <= window:
        return Convergence(
            False,
            None,
            window,
            tolerance,
            f"{len(accuracies)} epoch(s) trained: more than {window} are needed to tell",
        )
    before, last = max(accuracies[:-window]), max(accuracies[-window:])
    gain = last - before
    if gain > tolerance:
        reason = (
            f"val accuracy still rose by {100 * gain:.2f} points in the last {window} epochs "
            f"(more than {100 * tolerance:.2f})"
        )
        return Convergence(False, gain, window, tolerance, reason)
    reason = (
        f"val accuracy rose by {100 * max(gain, 0.0):.2f} points in the last {window} epochs "
        f"(at most {100 * tolerance:.2f})"
    )
    return Convergence(True, gain, window, tolerance, reason)
