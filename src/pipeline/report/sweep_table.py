"""The table a sweep ends with: one row per job plus the baseline, the Pareto-optimal rows
marked, and a PNG of accuracy against MACs and against latency with the front drawn.

Written as `summary.md` and `summary_pareto.png` into the sweep folder, printed, and logged to
the sweep's parent MLflow run; built from the jobs' outcome files (pipeline.sweeps.outcomes),
so failed, skipped and killed jobs have their rows too.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.files import atomic_path  # noqa: E402
from pipeline.report.compare import criterion, engine_name, pareto_front, sparsity_text  # noqa: E402
from pipeline.sweeps.outcomes import JobOutcome, swept

SUMMARY_FILE = "summary.md"
PARETO_FILE = "summary_pareto.png"
COLUMNS = [
    "job",
    "overrides",
    "pruner",
    "engine",
    "criterion",
    "sparsity",
    "accuracy",
    "change (pts, 95 % CI)",
    "params",
    "MACs",
    "size (MB)",
    "latency ratio (95 % CI)",
    "fine-tuning epochs",
    "status",
    "Pareto",
]


def _change(record: dict) -> str:
    change = record["accuracy_change"]
    verdict = "" if change["significant"] else " ns"
    return f"{change['points']:+.2f} [{change['ci_low']:+.2f}, {change['ci_high']:+.2f}]{verdict}"


def _latency(record: dict) -> str:
    ratio = record["latency_ratio"]
    noisy = " noisy" if ratio.get("noisy") else ""
    return f"{ratio['ratio']:.3f} [{ratio['ci_low']:.3f}, {ratio['ci_high']:.3f}]{noisy}"


def extra_batch_sizes(outcomes: list[JobOutcome]) -> list[int]:
    """The batch sizes some job timed beyond its headline one: a column each."""
    sizes = {
        row["batch_size"]
        for o in outcomes
        if o.record is not None
        for row in o.record.get("latency_by_batch", [])[1:]
    }
    return sorted(sizes)


def columns(extra: list[int]) -> list[str]:
    at = COLUMNS.index("latency ratio (95 % CI)") + 1
    return [*COLUMNS[:at], *(f"latency ratio, batch {b}" for b in extra), *COLUMNS[at:]]


def _batch_latency(record: dict, size: int) -> str:
    for row in record.get("latency_by_batch", []):
        if row["batch_size"] == size:
            return _latency(record | {"latency_ratio": row})
    return ""


def _model_cells(side: dict) -> list[str]:
    return [
        f"{100 * side['accuracy']:.2f} %",
        f"{int(side['params']):,}",
        f"{int(side['macs']):,}",
        f"{side['size_bytes'] / 1e6:.2f}",
    ]


def summary_rows(outcomes: list[JobOutcome]) -> list[list[str]]:
    """The table's rows: the baseline (of the first job with a record), then every job; a
    latency column for each batch size beyond the headline one (`columns`)."""
    extra = extra_batch_sizes(outcomes)
    measured = [o for o in outcomes if o.record is not None]
    front = pareto_front(
        [(o.record["pruned"]["macs"], o.record["pruned"]["accuracy"]) for o in measured]
    )
    on_front = {id(o): flag for o, flag in zip(measured, front, strict=True)}
    rows = []
    if measured:
        base = measured[0].record["baseline"]
        accuracy, params, macs, size = _model_cells(base)
        rows.append(
            ["-", "baseline", "-", "-", "-", "0", accuracy, "", params, macs, size, "1"]
            + ["1"] * len(extra)
            + ["", "", ""]
        )
    for outcome in outcomes:
        record = outcome.record
        overrides = swept(outcome, outcomes)
        if record is None:
            reason = outcome.status + (f": {outcome.error}" if outcome.error else "")
            rows.append([outcome.number, overrides, *[""] * (11 + len(extra)), reason, ""])
            continue
        config = record["config"]
        accuracy, params, macs, size = _model_cells(record["pruned"])
        pruner = outcome.pruner or config["pruner"]["_target_"].rsplit(".", 1)[-1]
        rows.append(
            [
                outcome.number,
                overrides,
                pruner,
                engine_name(record),
                criterion(record),
                sparsity_text(record),
                accuracy,
                _change(record),
                params,
                macs,
                size,
                _latency(record),
                *(_batch_latency(record, batch) for batch in extra),
                str(len(record.get("finetune_history") or [])),
                outcome.status,
                "yes" if on_front[id(outcome)] else "",
            ]
        )
    return rows


def markdown(rows: list[list[str]], extra: list[int] | None = None) -> str:
    header = columns(extra or [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    notes = [
        "",
        "accuracy: top-1 on the test split; change: pruned minus baseline on the same images, "
        "with its 95 % bootstrap interval (ns: the interval holds 0). Latency ratio: "
        "pruned/baseline p50 at the smallest batch size timed (batch 1 unless "
        "measure.batch_sizes says otherwise; other batch sizes in their own columns), with its "
        "95 % interval. Pareto: no other job is at least "
        "as accurate with no more MACs. skipped: finished before with the same settings.",
    ]
    return "\n".join(lines + notes) + "\n"


def pareto_plot(outcomes: list[JobOutcome], path: Path) -> Path | None:
    """Accuracy against MACs and against latency, the baseline as a star, the front joined."""
    measured = [o for o in outcomes if o.record is not None]
    if not measured:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    base = measured[0].record["baseline"]
    for ax, (label, cost) in zip(
        axes,
        [
            ("MACs (millions)", lambda side: side["macs"] / 1e6),
            (
                f"latency p50, batch {base.get('latency_batch_size', 1)} (ms)",
                lambda side: side["latency_ms"]["p50"],
            ),
        ],
        strict=True,
    ):
        points = [
            (cost(o.record["pruned"]), 100 * o.record["pruned"]["accuracy"]) for o in measured
        ]
        front = pareto_front(points)
        ax.scatter(*zip(*points, strict=True), color="tab:blue", label="pruned jobs", zorder=3)
        for (x, y), outcome in zip(points, measured, strict=True):
            ax.annotate(f"job {outcome.number}", (x, y), textcoords="offset points", xytext=(5, 4))
        front_points = sorted(p for p, flag in zip(points, front, strict=True) if flag)
        ax.step(
            *zip(*front_points, strict=True),
            where="post",
            color="tab:orange",
            label="Pareto front",
            zorder=2,
        )
        ax.scatter(
            [cost(base)], [100 * base["accuracy"]], marker="*", s=180, color="0.3", label="baseline"
        )
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.margins(0.12)
    axes[0].set_title("accuracy against MACs")
    axes[1].set_title("accuracy against latency")
    # One legend under both panels: inside, it would hide a job's point.
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path) as staging:
        figure.savefig(staging, dpi=100, format="png")
    plt.close(figure)
    return path


def write_summary(sweep_dir: Path, outcomes: list[JobOutcome]) -> tuple[Path, Path | None, str]:
    """summary.md and the Pareto PNG in the sweep folder; returns them and the table's text."""
    text = markdown(summary_rows(outcomes), extra_batch_sizes(outcomes))
    summary = Path(sweep_dir) / SUMMARY_FILE
    with atomic_path(summary) as staging:
        staging.write_text(f"# Sweep summary: {sweep_dir}\n\n{text}")
    return summary, pareto_plot(outcomes, Path(sweep_dir) / PARETO_FILE), text
