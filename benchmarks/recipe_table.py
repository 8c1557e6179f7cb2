"""benchmarks/recipe.py's table: its rows aggregated over seeds, one line per (budget,
recipe), the summary against the recipe targets, the control's verdict on the baseline, and the
Pareto plot."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.measure.uncertainty import accuracy_change, unpack_outcomes
from pipeline.pruning.budget import within_budget

CONTROL = "control"
# Each contender and the recipes it may run as: per budget, the one with the best mean validation
# accuracy stands for it (the test set chooses nothing). A recipe of no family is its own.
FAMILIES = {
    "reference": ("reference", "reference_kenning"),
    "torch_pruning": ("torch_pruning", "torch_pruning_global"),
    "pipeline": ("default", "pipeline_tp"),
}
# The recipe `python -m pipeline budget.macs=B` runs (pipeline.config.budget_pruner): the default
# a budget run gets, on which the target at MACs 0.5 is read; `default` is the project's defaults
# as composed without a command line, NNI's mean rank.
DEFAULT_FOR_BUDGETS = "pipeline_tp"
# The refereed targets: the pipeline's best never behind Torch-Pruning's best (paired interval)
# and ahead at this many budgets.
AHEAD_AT_LEAST = 2
# The summary's targets: points lost by the default at MACs 0.5; the default's loss as a share
# of the reference's at 0.35 and 0.25; the control's gain above which the baseline is called
# not converged.
DEFAULT_LOSS_TARGET = 0.5
LOSS_SHARE_BUDGETS = (0.35, 0.25)
LOSS_SHARE_TARGET = 1 / 3
CONTROL_GAIN_LIMIT = 0.3
# Every row's MACs within this of its budget: recipes compared at one model size
# (benchmarks/recipe.py runs with budget.tolerance at this value and budget.fallback=nearest:
# at most the budget where a model lands below it, else the nearest on either side).
MACS_WINDOW = 0.01


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def aggregate(rows: list[dict], recipes: list[str]) -> list[dict]:
    """One entry per (budget, recipe): mean, min, max and std over seeds; largest budget
    first, recipes in the order of `recipes`, the control last."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["budget"], row["recipe"]), []).append(row)
    out = []
    for (budget, recipe), group in groups.items():
        entry = {"budget": budget, "recipe": recipe, "seeds": [r["seed"] for r in group]}
        for key in ("accuracy", "points_lost", "macs_ratio", "params_ratio", "latency_ratio"):
            entry[key] = spread([r[key] for r in group])
        entry["met"] = all(r["met"] for r in group)
        entry["change"] = [[r["change_points"], *r["change_ci"]] for r in group]
        out.append(entry)
    order = {name: index for index, name in enumerate(recipes)}
    out.sort(key=lambda e: (e["budget"] is None, -(e["budget"] or 0), order[e["recipe"]]))
    return out


HEADER = (
    f"{'MACs':>5} {'recipe':>13} {'n':>2} {'accuracy':>8} {'(min-max)':>15} {'lost pts':>8} "
    f"{'(min..max)':>14} {'MACs':>6} {'params':>6} {'latency':>7} {'met':>3}  "
    "paired change, points [95 % CI], per seed"
)


def format_entry(entry: dict) -> str:
    acc, lost = entry["accuracy"], entry["points_lost"]
    budget = "none" if entry["budget"] is None else f"{entry['budget']:g}"
    changes = " ".join(f"{p:+.2f}[{lo:+.2f},{hi:+.2f}]" for p, lo, hi in entry["change"])
    return (
        f"{budget:>5} {entry['recipe']:>13} {len(entry['seeds']):>2} {acc['mean']:>8.4f} "
        f"({acc['min']:.4f}-{acc['max']:.4f}) {lost['mean']:>8.2f} "
        f"({lost['min']:>5.2f}..{lost['max']:>5.2f}) {entry['macs_ratio']['mean']:>6.3f} "
        f"{entry['params_ratio']['mean']:>6.3f} {entry['latency_ratio']['mean']:>7.3f} "
        f"{'yes' if entry['met'] else 'NO':>3}  {changes}"
    )


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def seed_gaps(default: dict, other: dict) -> list[float]:
    """Per seed, the default's accuracy minus `other`'s, in points (both rows of a seed prune
    the same baseline and are tested on the same images: the seed pairs them)."""
    changes = dict(zip(other["seeds"], other["change"], strict=True))
    return [
        change[0] - changes[seed][0]
        for seed, change in zip(default["seeds"], default["change"], strict=True)
        if seed in changes
    ]


def summary(entries: list[dict], rows: list[dict] = ()) -> str:
    """The targets' verdicts; `rows` (with per-image outcomes) make the comparisons paired."""
    by = {(e["budget"], e["recipe"]): e for e in entries}

    def lost(budget: float, recipe: str) -> float | None:
        entry = by.get((budget, recipe))
        return None if entry is None else entry["points_lost"]["mean"]

    parts = []
    default_half = lost(0.5, "default")
    parts.append(
        "MACs 0.5: default loses n/a (not run)"
        if default_half is None
        else f"MACs 0.5: default loses {default_half:.2f} pts (target <= {DEFAULT_LOSS_TARGET}: "
        f"{verdict(default_half <= DEFAULT_LOSS_TARGET)})"
    )
    for budget in LOSS_SHARE_BUDGETS:
        default, reference = lost(budget, "default"), lost(budget, "reference")
        if default is None or reference is None:
            parts.append(f"MACs {budget:g}: default/reference loss n/a (not run)")
            continue
        # A reference that loses nothing leaves nothing to divide by: report the points.
        if reference > 0:
            share = max(default, 0.0) / reference
            shown = f"{share:.3f}"
            met = verdict(share <= LOSS_SHARE_TARGET)
        else:
            shown, met = "n/a", verdict(default <= 0)
        parts.append(
            f"MACs {budget:g}: default/reference loss {shown} ({default:.2f}/{reference:.2f} "
            f"pts; target <= {LOSS_SHARE_TARGET:.3f}: {met})"
        )
    budgets = sorted({e["budget"] for e in entries if e["budget"] is not None}, reverse=True)
    others = dict.fromkeys(e["recipe"] for e in entries)
    for other in [r for r in others if r not in ("default", "reference", CONTROL)]:
        parts.append(accuracy_gaps(by, budgets, other, list(rows)))
    return "summary: " + "; ".join(part for part in parts if part)


def paired_difference(rows: list[dict], others: list[dict]) -> dict | None:
    """`rows`' accuracy minus `others`' in points, paired image by image: the rows of a seed
    prune the same baseline and are tested on the same images, so each (seed, image) is one
    pair (pipeline.measure.uncertainty.accuracy_change over the seeds' images together). None
    where a row has no per-image outcomes (computed before they were stored)."""
    theirs = {row["seed"]: row for row in others}
    mine, paired = [], []
    for row in rows:
        other = theirs.get(row["seed"])
        if other is None:
            continue
        if "outcomes" not in row or "outcomes" not in other:
            return None
        mine.append(unpack_outcomes(row["outcomes"]))
        paired.append(unpack_outcomes(other["outcomes"]))
    if not mine:
        return None
    change = accuracy_change(np.concatenate(paired), np.concatenate(mine))
    return change | {"seeds": len(mine), "verdict": standing(change)}


def standing(change: dict) -> str:
    """ahead / behind when the paired 95 % interval excludes 0, else level."""
    if change["ci_low"] > 0:
        return "ahead"
    return "behind" if change["ci_high"] < 0 else "level"


def rows_of(rows: list[dict], budget: float, recipe: str | None) -> list[dict]:
    """The rows (one per seed) of `recipe` at `budget`."""
    return [r for r in rows if r["budget"] == budget and r["recipe"] == recipe]


def best_on_validation(rows: list[dict], keep: Callable[[dict], bool]) -> str | None:
    """Among the rows `keep` accepts, the recipe with the best mean validation accuracy: the
    test set chooses nothing."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        if keep(row) and row.get("val_accuracy") is not None:
            scores.setdefault(row["recipe"], []).append(row["val_accuracy"])
    if not scores:
        return None
    return max(scores, key=lambda recipe: statistics.fmean(scores[recipe]))


def best_other(rows: list[dict], budget: float, exclude: str) -> str | None:
    """The peer a recipe is compared with: the best other recipe on validation at `budget`."""
    return best_on_validation(
        rows, lambda r: r["budget"] == budget and r["recipe"] not in (exclude, CONTROL)
    )


def paired_lines(rows: list[dict], recipes: list[str]) -> list[str]:
    """Per budget and recipe: its paired difference against the best other recipe on
    validation, with the 95 % interval, McNemar's p and the standing it gives."""
    lines = []
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None}, reverse=True)
    for budget in budgets:
        for recipe in recipes:
            mine, peer = rows_of(rows, budget, recipe), best_other(rows, budget, recipe)
            if not mine or peer is None:
                continue
            change = paired_difference(mine, rows_of(rows, budget, peer))
            if change is None:
                lines.append(f"{budget:>5g} {recipe:>13} vs {peer}: no per-image outcomes")
                continue
            lines.append(
                f"{budget:>5g} {recipe:>13} vs {peer} (best other on validation): "
                f"{change['points']:+.2f} pts [{change['ci_low']:+.2f}, {change['ci_high']:+.2f}]"
                f" over {change['images']} image-seed pairs, McNemar p={change['p_value']:.2g}: "
                f"{change['verdict']}"
            )
    return lines


def family_of(recipe: str) -> str:
    return next((name for name, members in FAMILIES.items() if recipe in members), recipe)


def family_bests(rows: list[dict]) -> dict[tuple[float, str], str]:
    """(budget, family) -> the family's recipe with the best mean validation accuracy there."""
    keys = {(r["budget"], family_of(r["recipe"])) for r in rows if r["budget"] is not None}
    bests = {
        key: best_on_validation(
            rows, lambda r, key=key: (r["budget"], family_of(r["recipe"])) == key
        )
        for key in keys
    }
    return {key: recipe for key, recipe in bests.items() if recipe is not None}


def refereed(rows: list[dict]) -> list[str]:
    """The issue's targets on each family at its best per budget (chosen on validation): the
    pipeline against Torch-Pruning, paired (never behind, ahead at AHEAD_AT_LEAST budgets), the
    pipeline's loss against the reference's at LOSS_SHARE_BUDGETS, and the default's loss at
    0.5; one line each, with the recipes that stood for each family."""
    bests = family_bests(rows)
    budgets = sorted({budget for budget, _ in bests}, reverse=True)

    def chosen(budget: float, family: str) -> list[dict]:
        return rows_of(rows, budget, bests.get((budget, family)))

    def lost(group: list[dict]) -> float:
        return statistics.fmean(r["points_lost"] for r in group)

    lines, standings = [], []
    for budget in budgets:
        mine, theirs = chosen(budget, "pipeline"), chosen(budget, "torch_pruning")
        if not mine or not theirs:
            continue
        change = paired_difference(mine, theirs)
        names = f"{mine[0]['recipe']} - {theirs[0]['recipe']}"
        if change is None:
            lines.append(f"refereed MACs {budget:g}: {names}: no per-image outcomes")
            continue
        standings.append(change["verdict"])
        lines.append(
            f"refereed MACs {budget:g}: pipeline best - Torch-Pruning best ({names}): "
            f"{change['points']:+.2f} pts [{change['ci_low']:+.2f}, {change['ci_high']:+.2f}], "
            f"McNemar p={change['p_value']:.2g}: {change['verdict']}"
        )
    if standings:
        ahead = standings.count("ahead")
        never_behind = "behind" not in standings
        lines.append(
            f"refereed: pipeline never behind Torch-Pruning: {verdict(never_behind)}; ahead at "
            f"{ahead} of {len(standings)} budgets (target >= {AHEAD_AT_LEAST}: "
            f"{verdict(ahead >= AHEAD_AT_LEAST)})"
        )
    for budget in LOSS_SHARE_BUDGETS:
        mine, reference = chosen(budget, "pipeline"), chosen(budget, "reference")
        if mine and reference:
            share = max(lost(mine), 0.0) / lost(reference) if lost(reference) > 0 else None
            shown = "n/a" if share is None else f"{share:.3f}"
            met = verdict(share is not None and share <= LOSS_SHARE_TARGET)
            lines.append(
                f"refereed MACs {budget:g}: {mine[0]['recipe']} loses {lost(mine):.2f} pts, "
                f"{reference[0]['recipe']} {lost(reference):.2f}: share {shown} (target <= "
                f"{LOSS_SHARE_TARGET:.3f}: {met})"
            )
    lines.append(macs_window_line(rows))
    for recipe in dict.fromkeys((DEFAULT_FOR_BUDGETS, "default")):
        default = rows_of(rows, 0.5, recipe)
        if default:
            what = "the default for budgets" if recipe == DEFAULT_FOR_BUDGETS else "mean_rank"
            lines.append(
                f"refereed MACs 0.5: {recipe} ({what}) loses {lost(default):.2f} pts (target <= "
                f"{DEFAULT_LOSS_TARGET}: {verdict(lost(default) <= DEFAULT_LOSS_TARGET)})"
            )
    return lines


def macs_window_line(rows: list[dict]) -> str:
    """Whether every pruned row's MACs ratio lies within MACS_WINDOW of its budget, naming the
    rows outside (a budget search whose whole-channel steps jump over the window both ways)
    and those over it (landed by budget.fallback=nearest: more MACs than the budget gives)."""
    pruned = [row for row in rows if row["budget"] is not None]
    outside = [
        row
        for row in pruned
        if not within_budget(
            "macs", row["budget"], MACS_WINDOW + 1e-9, row["macs_ratio"], "nearest"
        )
    ]
    over = [row for row in pruned if row["macs_ratio"] > row["budget"] and row not in outside]

    def named(some: list[dict]) -> str:
        return ", ".join(
            f"{row['recipe']} seed {row['seed']} at MACs {row['budget']:g}: {row['macs_ratio']:.4f}"
            for row in some
        )

    return (
        f"refereed: every row's MACs within {MACS_WINDOW} of its budget: "
        f"{verdict(not outside)} ({len(pruned) - len(outside)} of {len(pruned)} rows"
        + (f"; outside: {named(outside)}" if outside else "")
        + (f"; over it: {named(over)}" if over else "")
        + ")"
    )


def accuracy_gaps(by: dict, budgets: list[float], other: str, rows: list[dict] = ()) -> str:
    """The default's accuracy minus `other`'s at each budget: paired over images and seeds with
    its interval and standing where the rows hold per-image outcomes, else the per-seed gaps."""
    gaps = []
    for budget in budgets:
        default, peer = by.get((budget, "default")), by.get((budget, other))
        change = paired_difference(rows_of(rows, budget, "default"), rows_of(rows, budget, other))
        if default and peer and change is not None:
            gaps.append(
                f"{budget:g}: {change['points']:+.2f} [{change['ci_low']:+.2f}, "
                f"{change['ci_high']:+.2f}] paired: {change['verdict']}"
            )
        elif default and peer:
            gap = 100.0 * (default["accuracy"]["mean"] - peer["accuracy"]["mean"])
            per_seed = seed_gaps(default, peer)
            agree = (
                "ahead at every seed"
                if all(g > 0 for g in per_seed)
                else "behind at every seed"
                if all(g < 0 for g in per_seed)
                else "seeds disagree"
            )
            shown = "/".join(f"{g:+.2f}" for g in per_seed)
            gaps.append(f"{budget:g}: {gap:+.2f} (seeds {shown}: {agree})")
    return f"default - {other} accuracy, pts: {', '.join(gaps)} (target > 0)" if gaps else ""


# Printed under the summary: what no interval in the table covers.
ONE_BASELINE = (
    "note: every seed prunes the same baseline, so neither the intervals nor the seed spread "
    "include the variance of training the baseline again; a difference between recipes that "
    "another baseline could reverse is a claim only once it holds again with other --seeds "
    "(the first seed trains the baseline and draws the split)"
)


def control_line(entries: list[dict], convergence: dict | None) -> str:
    """The baseline's convergence check, and what fine-tuning alone added to it."""
    control = next((e for e in entries if e["recipe"] == CONTROL), None)
    verdict = (
        "unknown"
        if convergence is None
        else ("converged" if convergence["converged"] else "NOT converged")
        + f" ({convergence['reason']})"
    )
    line = f"baseline convergence check: {verdict}"
    if control is not None:
        gain = 0.0 - control["points_lost"]["mean"]  # 0.0 - 0.0, never "-0.00"
        line += f"; control (fine-tuning alone, unpruned): {gain:+.2f} pts"
        if gain > CONTROL_GAIN_LIMIT:
            line += (
                f" > {CONTROL_GAIN_LIMIT}: the baseline is not converged; part of every "
                "recipe's accuracy is extra training"
            )
        elif gain < -CONTROL_GAIN_LIMIT:
            line += (
                f" < -{CONTROL_GAIN_LIMIT}: the fine-tuning itself costs the unpruned model "
                "accuracy; part of every recipe's loss is the fine-tuning's, not the pruning's"
            )
    return line


def plot(entries: list[dict], baseline_accuracy: float, path: Path) -> Path:
    """Accuracy against MACs ratio (left) and CPU latency ratio (right), mean and min-max over
    seeds, one line per recipe; the control at ratio 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for recipe in dict.fromkeys(e["recipe"] for e in entries):
        points = sorted(
            (e for e in entries if e["recipe"] == recipe), key=lambda e: e["macs_ratio"]["mean"]
        )
        if not points:
            continue
        for axis, key in zip(axes, ("macs_ratio", "latency_ratio"), strict=True):
            x = [e[key]["mean"] for e in points]
            y = [e["accuracy"]["mean"] for e in points]
            yerr = [
                [e["accuracy"]["mean"] - e["accuracy"]["min"] for e in points],
                [e["accuracy"]["max"] - e["accuracy"]["mean"] for e in points],
            ]
            xerr = [
                [e[key]["mean"] - e[key]["min"] for e in points],
                [e[key]["max"] - e[key]["mean"] for e in points],
            ]
            axis.errorbar(
                x,
                y,
                yerr=yerr,
                xerr=xerr,
                marker="o",
                capsize=3,
                label=recipe,
                linestyle="none" if recipe == CONTROL else "-",
            )
    labels = ("MACs ratio (pruned / baseline)", "CPU latency ratio (pruned / baseline)")
    for axis, label in zip(axes, labels, strict=True):
        axis.axhline(baseline_accuracy, color="grey", linestyle=":", label="baseline")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy after fine-tuning")
    axes[0].legend()
    figure.suptitle("Recipes at equal MACs budgets (mean, min-max over seeds)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def cost_line(rows: list[dict], wall: float, trained_now: float | None) -> str:
    """What the benchmark costs with the baseline cached: this run's wall time (less the
    baseline's training, `trained_now`, where it trained) plus what the rows it found cached
    took when they were computed."""
    cached = [row for row in rows if row.get("cached")]
    earlier = [row["seconds"] for row in cached if "seconds" in row]
    text = f"cost with the baseline cached: {len(rows) - len(cached)} rows computed now"
    if len(earlier) < len(cached):
        return text + f", {len(cached) - len(earlier)} cached rows of unknown cost"
    total = wall - (trained_now or 0.0) + sum(earlier)
    return text + f", {len(cached)} cached rows that took {sum(earlier):.0f} s: {total:.0f} s"
