"""The report's tables: results, resource use during inference, and per-class quality."""

from __future__ import annotations

import math
import statistics

from pipeline.measure.uncertainty import mcnemar_exact
from pipeline.report.compare import (
    Model,
    criterion,
    engine_name,
    pareto_front,
    pruner_name,
    sparsity_text,
)
from pipeline.report.console import accuracy_cell, latency_cell
from pipeline.report.document import Cell, Strong, Table

WORST_CLASSES = 3  # per pruned model, the classes whose recall fell most are marked
MAX_CLASS_ROWS = 30  # beyond this many classes, only the marked ones are listed
SIGNIFICANCE = 0.05


def _int(value: float) -> str:
    return f"{int(value):,}"


def results_table(models: list[Model]) -> Table:
    front = pareto_front([(m.figures["macs"], m.figures["accuracy"]) for m in models])
    rows: list[list[Cell]] = []
    for model, on_front in zip(models, front, strict=True):
        figures = model.figures
        if model.is_baseline:
            change = latency_change = reduction = "—"
            pruner = engine = ranking = sparsity = "—"
        else:
            record = model.record
            change = accuracy_cell(record["accuracy_change"])
            change += f" (p={record['accuracy_change']['p_value']:.2g})"
            latency_change = latency_cell(record["latency_ratio"])
            reduction = f"{record['reduction_pct']['size_bytes']:.1f} %"
            pruner, sparsity = pruner_name(model.runs[0]), sparsity_text(record)
            engine, ranking = engine_name(record), criterion(record)
        rows.append(
            [
                model.label,
                pruner,
                engine,
                ranking,
                sparsity,
                f"{100 * figures['accuracy']:.2f} %",
                change,
                f"{100 * figures['top5']:.2f} %",
                _int(figures["params"]),
                f"{figures['size_bytes'] / 1e6:.2f}",
                f"{figures['macs'] / 1e6:.2f}",
                f"{model.latency_p50:.2f}",
                latency_change,
                f"{model.throughput:.1f}",
                reduction,
                "yes" if on_front else "no",
            ]
        )
    device = models[0].figures.get("latency_device", "?")
    batch = models[0].figures.get("latency_batch_size", 1)
    shared = [m for m in models if m.is_baseline and len(m.runs) > 1]
    caption = (
        f"Accuracy on the test set; the change is pruned minus baseline in points with its 95 % "
        f"paired bootstrap interval and McNemar's exact p. Latency: batch {batch} on {device}, the "
        f"change is the pruned/baseline ratio of alternating timing rounds with its 95 % "
        f"interval. Throughput: images/s at the throughput batch size. Front: on the "
        f"accuracy/MACs Pareto front (no other model is as accurate for fewer MACs)."
    )
    if shared:
        caption += (
            " A baseline shared by several runs shows the median of its latencies and "
            "throughputs in those runs."
        )
    return Table(
        header=[
            "model",
            "pruner",
            "engine",
            "criterion",
            "sparsity",
            "top-1",
            "Δ top-1, pts [95 % CI] (McNemar p)",
            "top-5",
            "params",
            "size (MB)",
            "MACs (M)",
            "latency p50 (ms)",
            "latency change [95 % CI]",
            "throughput (img/s)",
            "size reduction",
            "front",
        ],
        rows=rows,
        caption=caption,
        name="results",
    )


def batch_sizes(models: list[Model]) -> list[int]:
    """Every batch size some pruned model was timed at (measure.batch_sizes)."""
    return sorted(
        {
            row["batch_size"]
            for m in models
            if not m.is_baseline
            for row in m.record.get("latency_by_batch", [])
        }
    )


def batch_table(models: list[Model]) -> Table | None:
    """Per pruned model and batch size: both models' p50, the ratio with its interval, the
    MACs ratio it would follow if latency tracked MACs, and on CUDA the peak memory ratio."""
    sizes = batch_sizes(models)
    if not sizes:
        return None
    rows: list[list[Cell]] = []
    for model in (m for m in models if not m.is_baseline):
        record = model.record
        macs = record["pruned"]["macs"] / record["baseline"]["macs"]
        for row in record.get("latency_by_batch", []):
            memory = row.get("peak_memory_mb") or {}
            peak = (
                f"{memory['baseline']:.1f} → {memory['pruned']:.1f} "
                f"({memory['pruned'] / memory['baseline']:.3f})"
                if memory.get("baseline") and memory.get("pruned") is not None
                else "—"
            )
            rows.append(
                [
                    model.label,
                    str(row["batch_size"]),
                    f"{row['baseline_ms']['p50']:.2f}",
                    f"{row['pruned_ms']['p50']:.2f}",
                    f"{row['ratio']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
                    + (" noisy" if row["noisy"] else ""),
                    f"{macs:.3f}",
                    f"{row['ratio'] / macs:.2f}",
                    peak,
                ]
            )
    device = models[0].figures.get("latency_device", "?")
    return Table(
        header=[
            "model",
            "batch",
            "baseline p50 (ms)",
            "pruned p50 (ms)",
            "latency ratio [95 % CI]",
            "MACs ratio",
            "latency / MACs",
            "peak GPU memory, MiB (ratio)",
        ],
        rows=rows,
        caption=(
            f"Latency on {device} at each batch size timed (measure.batch_sizes): the pruned/"
            f"baseline ratio of alternating timing rounds at that batch size, with its 95 % "
            f"interval. latency / MACs near 1: the pruned model is as much faster as it has "
            f"fewer MACs; above 1, fixed costs per call (kernel launches, memory traffic) hold "
            f"it back. Peak GPU memory: weights, input and PyTorch's peak allocation during one "
            f"call (CUDA only)."
        ),
        name="batch_sizes",
    )


RESOURCE_SERIES = {
    "cpu": [("process_cpu_percent", "process CPU (%)"), ("process_rss_mb", "process RSS (MB)")],
    "cuda": [
        ("gpu_utilization_percent", "GPU utilisation (%)"),
        ("gpu_memory_mb", "GPU memory used (MB)"),
        ("torch_cuda_peak_mb", "PyTorch peak allocated (MB)"),
        ("process_cpu_percent", "process CPU (%)"),
    ],
}


def resource_series(models: list[Model]) -> tuple[str, list[tuple[str, str]]]:
    """The device the windows ran on and the series to show: GPU ones on CUDA."""
    windows = [m.record.get("inference_resources") for m in models]
    device = next((w["device"] for w in windows if w), "cpu")
    present = {key for m in models if m.resources for key in m.resources}
    wanted = RESOURCE_SERIES.get(device, RESOURCE_SERIES["cpu"])
    return device, [(key, label) for key, label in wanted if key in present]


def resources_table(models: list[Model]) -> Table | None:
    device, series = resource_series(models)
    measured = [m for m in models if m.resources]
    if not measured or not series:
        return None
    rows: list[list[Cell]] = []
    for key, label in series:
        for model in measured:
            values = [v for v in model.resources.get(key, []) if not math.isnan(v)]
            if not values:
                continue
            rows.append(
                [
                    label,
                    model.label,
                    f"{statistics.fmean(values):.1f}",
                    f"{statistics.median(values):.1f}",
                    f"{max(values):.1f}",
                    str(len(values)),
                ]
            )
    window = next(m.record["inference_resources"] for m in measured)
    return Table(
        header=["series", "model", "mean", "median", "max", "samples"],
        rows=rows,
        caption=(
            f"Sampled every {window['interval_s']} s while each model ran inference alone on "
            f"{device} (batches of {window['batch_size']}, after the paired timing)."
        ),
        name="resources",
    )


def class_changes(model: Model) -> list[dict]:
    """Per class of a pruned model: precision and recall of it and of its baseline, the recall
    change in points and McNemar's p on the images of that class only one model gets right."""
    mine, base = model.per_class, model.baseline.per_class
    split = model.record["per_class"]
    rows = []
    for index, support in enumerate(mine["support"]):
        recall = _ratio(mine["correct"][index], support)
        base_recall = _ratio(base["correct"][index], support)
        rows.append(
            {
                "class": index,
                "support": support,
                "precision": _ratio(mine["correct"][index], mine["predicted"][index]),
                "recall": recall,
                "base_precision": _ratio(base["correct"][index], base["predicted"][index]),
                "base_recall": base_recall,
                "recall_change": 100.0 * (recall - base_recall),
                "p_value": mcnemar_exact(
                    split["only_baseline_right"][index], split["only_pruned_right"][index]
                ),
            }
        )
    return rows


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


def worst_classes(changes: list[dict]) -> list[dict]:
    """The classes whose recall fell most (only falls count)."""
    fell = [row for row in changes if row["recall_change"] < 0]
    return sorted(fell, key=lambda row: row["recall_change"])[:WORST_CLASSES]


def per_class_table(baseline: Model, pruned: list[Model]) -> Table | None:
    """Precision and recall per class of a baseline and the models pruned from it; the classes
    whose recall fell most after pruning are in bold, `*` marks a change unlikely to be noise."""
    pruned = [m for m in pruned if m.per_class]
    if baseline.per_class is None or not pruned:
        return None
    changes = {m.label: class_changes(m) for m in pruned}
    marked = {
        label: {row["class"] for row in worst_classes(rows)} for label, rows in changes.items()
    }
    support = baseline.per_class["support"]
    shown = range(len(support))
    if len(support) > MAX_CLASS_ROWS:
        shown = sorted(set().union(*marked.values()))
    base_rows = class_changes(pruned[0])
    rows: list[list[Cell]] = []
    for index in shown:
        row: list[Cell] = [
            str(index),
            str(support[index]),
            _percent(base_rows[index]["base_precision"]),
            _percent(base_rows[index]["base_recall"]),
        ]
        for model in pruned:
            change = changes[model.label][index]
            star = "*" if change["p_value"] < SIGNIFICANCE else ""
            cell = f"{_percent(change['recall'])} ({change['recall_change']:+.1f}{star})"
            worst = index in marked[model.label]
            row += [_percent(change["precision"]), Strong(cell) if worst else cell]
        rows.append(row)
    header = ["class", "support", f"{baseline.label} P", f"{baseline.label} R"]
    for model in pruned:
        header += [f"{model.label} P", f"{model.label} R (Δ pts)"]
    caption = (
        f"P: precision, R: recall, in % per class on the test set; Δ: recall change from the "
        f"baseline in points. Bold: the {WORST_CLASSES} classes whose recall fell most for "
        f"that model; *: McNemar p < {SIGNIFICANCE} on that class's images (each class tested "
        f"alone: with many classes, expect a few marks by chance)."
    )
    if len(support) > MAX_CLASS_ROWS:
        caption += f" Only the marked classes are listed ({len(shown)} of {len(support)})."
    return Table(header=header, rows=rows, caption=caption, name="per-class")


def _percent(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}"


def worst_class_lines(pruned: list[Model]) -> list[str]:
    """One line per pruned model naming the classes it hurt most."""
    lines = []
    for model in pruned:
        if not model.per_class or not model.baseline.per_class:
            continue
        worst = worst_classes(class_changes(model))
        if not worst:
            lines.append(f"{model.label}: no class lost recall")
            continue
        parts = [
            f"class {row['class']} {row['recall_change']:+.1f} pts (p={row['p_value']:.2g}"
            + (", significant)" if row["p_value"] < SIGNIFICANCE else ", may be noise)")
            for row in worst
        ]
        lines.append(f"{model.label}: " + "; ".join(parts))
    return lines
