"""Assemble the comparison report of some runs: tables, figures and notes, written as report.md
and a self-contained report.html into one folder."""

from __future__ import annotations

from pathlib import Path

from pipeline.report import figures
from pipeline.report.compare import Model, compared_models
from pipeline.report.console import notes as run_notes
from pipeline.report.document import (
    Bullets,
    Cell,
    Document,
    Heading,
    Image,
    Link,
    Table,
    Text,
    write,
)
from pipeline.report.sources import ReportError, RunRecord
from pipeline.report.tables import (
    batch_table,
    per_class_table,
    resources_table,
    results_table,
    worst_class_lines,
)


def build_report(
    runs: list[RunRecord], out: Path, title: str | None = None, notes: list[str] | None = None
) -> tuple[Path, Path]:
    """Write report.md, report.html and the PNGs they show into `out`; returns the two
    reports. `notes`: what the caller left out and why (failed jobs, unreadable runs)."""
    if not runs:
        raise ReportError("no runs to report on; give finished runs")
    out.mkdir(parents=True, exist_ok=True)
    models = compared_models(runs)
    pruned = [m for m in models if not m.is_baseline]
    document = Document(title or default_title(runs))
    document.add(Text(_overview(runs, models)))

    document.add(Heading("Results"), results_table(models))
    document.add(Bullets(_run_notes(pruned) + list(notes or [])))

    document.add(
        Heading("Size, speed and quality"),
        _image(
            figures.size_speed_quality(models, out / "size_speed_quality.png"),
            "accuracy against latency, bubble area proportional to parameters",
            "Bars: 95 % intervals of each pruned model's accuracy change and latency ratio.",
        ),
        _image(
            figures.accuracy_vs_macs(models, out / "accuracy_vs_macs.png"),
            "accuracy against MACs with the Pareto front",
        ),
    )

    document.add(Heading("Latency at each batch size"))
    by_batch = figures.latency_by_batch(models, out / "latency_by_batch.png")
    if by_batch is None:
        document.add(Text(_older("latency at each batch size")))
    document.add(
        _image(by_batch, "latency ratio against batch size, one line per pruned model"),
        batch_table(models),
    )

    document.add(Heading("Resource use during inference"))
    resources = figures.inference_resources(models, out / "inference_resources.png")
    if resources is None:
        document.add(Text(_older("resource use during inference")))
    document.add(_image(resources, "resource use over time, one line per model"))
    document.add(resources_table(models))

    document.add(Heading("Per-class quality"))
    lines = worst_class_lines(pruned)
    if not lines:
        document.add(Text(_older("per-class counts")))
    document.add(
        Bullets(lines) if lines else None,
        _image(
            figures.recall_changes(models, out / "recall_change.png"),
            "recall change per class and pruned model",
        ),
    )
    for baseline in (m for m in models if m.is_baseline):
        document.add(per_class_table(baseline, [m for m in pruned if m.baseline is baseline]))
    document.add(
        _image(
            figures.confusion_matrices(models, out / "confusion_matrices.png"),
            "confusion matrix of each model",
        )
    )

    document.add(Heading("Fine-tuning and pruning curves"))
    curves = figures.finetune_curves(models, out / "finetune_curves.png")
    if curves is None:
        document.add(Text("No fine-tuning epoch ran in these runs (finetune.epochs=0)."))
    document.add(
        _image(curves, "fine-tuning train loss and val accuracy per epoch"),
        _image(
            figures.pruning_steps(models, out / "pruning_steps.png"),
            "parameters and val accuracy per pruning step",
        ),
    )

    document.add(Heading("Runs"), _runs_table(pruned))
    return write(document, out)


def default_title(runs: list[RunRecord]) -> str:
    config = runs[0].record.get("config", {})
    name = lambda node: str((node or {}).get("_target_", "?")).rsplit(".", 1)[-1]  # noqa: E731
    return (
        f"Pruning report: {name(config.get('model'))} on {name(config.get('dataset'))}, "
        f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
    )


def _overview(runs: list[RunRecord], models: list[Model]) -> str:
    devices = sorted({str(run.record.get("device", "?")) for run in runs})
    baselines = sum(m.is_baseline for m in models)
    tested = {run.record["accuracy_change"].get("images") for run in runs}
    return (
        f"{len(models) - baselines} pruned model(s) against {baselines} baseline(s), on "
        f"{', '.join(devices)}; accuracy on {', '.join(map(str, sorted(tested, key=str)))} test "
        f"images. Each pruned model is compared with the baseline measured in its own run."
    )


def _run_notes(pruned: list[Model]) -> list[str]:
    """Each run's notes (convergence, the paired counts, timing noise); a note that several runs
    share (their common baseline had not converged) once, with the models it concerns."""
    models_by_line: dict[str, list[str]] = {}
    for model in pruned:
        for line in run_notes(model.record):
            models_by_line.setdefault(line, []).append(model.label)
    return [f"{', '.join(labels)}: {line}" for line, labels in models_by_line.items()]


def _image(path: Path | None, alt: str, caption: str = "") -> Image | None:
    return Image(path, alt, caption) if path is not None else None


def _older(what: str) -> str:
    return (
        f"No {what} in these runs' measurements.json: they were measured before the pipeline "
        f"recorded it; rerun them to see it here."
    )


def _runs_table(pruned: list[Model]) -> Table:
    named = any(model.runs[0].name for model in pruned)
    logged = any((model.record.get("mlflow_models") or {}).get("pruned") for model in pruned)
    rows = []
    for model in pruned:
        run = model.runs[0]
        seconds = sum(stage["seconds"] for stage in run.record.get("stages", {}).values())
        name = [run.name or "—"] if named else []
        link = [_model_link(run.record)] if logged else []
        rows.append(
            [
                model.label,
                *name,
                run.source,
                str(run.record.get("device", "?")),
                f"{seconds:.0f}",
                *link,
            ]
        )
    caption = "Where each pruned model's figures come from."
    if logged:
        caption += (
            " MLflow model: the pruned network as an MLflow model (its page in the UI, served "
            "by `mlflow ui` on the run's store); load it with mlflow.pyfunc.load_model(URI)."
        )
    return Table(
        header=[
            "model",
            *(["run name"] if named else []),
            "source",
            "device",
            "run time (s)",
            *(["MLflow model"] if logged else []),
        ],
        rows=rows,
        caption=caption,
        name="runs",
    )


def _model_link(record: dict) -> Cell:
    """The run's pruned MLflow model, as a link to its page; "—" when it logged none."""
    model = (record.get("mlflow_models") or {}).get("pruned")
    if not model:
        return "—"
    return Link(model["uri"], model["address"]) if model.get("address") else model["uri"]
