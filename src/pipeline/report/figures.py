"""The report's figures, one PNG each: size/speed/quality, the accuracy/MACs frontier, resource
use during inference, confusion matrices, per-class recall changes, fine-tuning and pruning
curves. Every model keeps one colour across figures; the baselines are grey."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from pipeline.files import atomic_path  # noqa: E402
from pipeline.report.compare import Model, engine_name, pareto_front  # noqa: E402
from pipeline.report.tables import SIGNIFICANCE, class_changes, resource_series  # noqa: E402

DPI = 110
BUBBLE_MAX_AREA = 2400.0  # points^2 of the largest model's bubble
ANNOTATE_CLASSES = 12  # confusion cells and recall changes get numbers up to this many classes
BASELINE_GREYS = ["0.25", "0.5", "0.65"]
# Models often coincide (same accuracy on a small test set, same memory): a marker of its own
# keeps each line visible where it runs under another.
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
ENGINE_MARKERS = ["o", "s", "D", "^"]


def colours(models: list[Model]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    result, pruned = {}, 0
    for index, model in enumerate(m for m in models if m.is_baseline):
        result[model.label] = BASELINE_GREYS[index % len(BASELINE_GREYS)]
    for model in models:
        if not model.is_baseline:
            result[model.label] = cycle[pruned % len(cycle)]
            pruned += 1
    return result


def line_style(models: list[Model], model: Model) -> dict:
    """Colour, marker and width of a model's line; a baseline is dashed and drawn on top."""
    index = [m.label for m in models].index(model.label)
    style = {
        "color": colours(models)[model.label],
        "marker": MARKERS[index % len(MARKERS)],
        "markersize": 7 - min(index, 3),
        "linewidth": 1.5,
        "label": model.label,
    }
    if model.is_baseline:
        style |= {"linestyle": "--", "linewidth": 2.0, "zorder": 5}
    return style


def _count(value: float) -> str:
    """4.13 M, 52.0 k, 900: a parameter count at a glance."""
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    return f"{value / 1e3:.1f} k" if value >= 1e3 else f"{value:.0f}"


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as staging:  # a killed run leaves no half-written figure
        figure.savefig(staging, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(figure)
    return path


# Offsets (points) tried in turn for a point's label, nearest first.
LABEL_OFFSETS = [
    (r * dx, r * dy)
    for r in (1, 1.6, 2.4, 3.5, 5)
    for dx, dy in ((10, 8), (10, -12), (-10, 8), (-10, -12), (0, 14), (0, -18), (14, 0), (-14, 0))
]


def place_labels(ax, points: list[tuple[float, float, str, str]], radii: list[float]) -> None:
    """Label each (x, y, text, colour) point where the label overlaps no other label and no
    marker (`radii`, in points, their sizes) and stays inside the axes; a thin line joins a
    label to its marker's edge."""
    figure = ax.figure
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    to_pixels = figure.dpi / 72.0
    taken = []
    for (x, y, _text, _colour), radius in zip(points, radii, strict=True):
        px, py = ax.transData.transform((x, y))
        r = radius * to_pixels
        taken.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
    for (x, y, text, colour), radius in zip(points, radii, strict=True):
        # Nowhere free (a crowded plot): the nearest place, overlapping, as the last try.
        for attempt, (dx, dy) in enumerate([*LABEL_OFFSETS, LABEL_OFFSETS[0]]):
            fallback = attempt == len(LABEL_OFFSETS)
            scale = 0.6 + radius / 12.0
            annotation = ax.annotate(
                text,
                (x, y),
                xytext=(dx * scale, dy * scale),
                textcoords="offset points",
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                fontsize=9,
                color=colour,
                arrowprops={
                    "arrowstyle": "-",
                    "color": colour,
                    "lw": 0.6,
                    "alpha": 0.8,
                    "shrinkA": 0,
                    "shrinkB": radius,
                },
            )
            # The text alone: an annotation's own extent includes its line to the point.
            annotation.update_positions(renderer)
            box = Text.get_window_extent(annotation, renderer).padded(3)
            fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if fallback or (fits and not any(box.overlaps(other) for other in taken)):
                taken.append(box)
                break
            annotation.remove()


def size_speed_quality(models: list[Model], path: Path) -> Path:
    """Accuracy against batch-1 latency, bubble area proportional to parameters; bars: 95 %
    intervals of the pruned models' accuracy change and latency ratio."""
    colour = colours(models)
    largest = max(m.figures["params"] for m in models)
    figure, ax = plt.subplots(figsize=(9, 5.6))
    radii = []
    for model in models:
        x = model.latency_p50
        y = 100 * model.figures["accuracy"]
        area = BUBBLE_MAX_AREA * model.figures["params"] / largest
        radii.append(math.sqrt(area / math.pi))
        ax.scatter(
            x,
            y,
            s=area,
            color=colour[model.label],
            alpha=0.45,
            edgecolors="black",
            linewidths=0.8,
            zorder=3,
        )
        if not model.is_baseline:
            change, ratio = model.record["accuracy_change"], model.record["latency_ratio"]
            # An accuracy stays within 0..100 %, whatever the bootstrap's tails say.
            low, high = (
                max(y + change["ci_low"] - change["points"], 0.0),
                min(y + change["ci_high"] - change["points"], 100.0),
            )
            yerr = [[y - low], [high - y]]
            xerr = [
                [x - x * ratio["ci_low"] / ratio["ratio"]],
                [x * ratio["ci_high"] / ratio["ratio"] - x],
            ]
            ax.errorbar(
                x,
                y,
                xerr=xerr,
                yerr=yerr,
                color=colour[model.label],
                capsize=3,
                linewidth=1,
                zorder=4,
            )
    ax.set(
        xlabel=f"latency p50, batch {models[0].figures.get('latency_batch_size', 1)} (ms)",
        ylabel="top-1 accuracy (%)",
        title="Size, speed and quality: bubble area proportional to parameters",
    )
    ax.margins(x=0.25, y=0.2)
    bottom, top = ax.get_ylim()
    ax.set_ylim(max(bottom, -2.0), min(top, 102.0))
    ax.set_xlim(left=max(ax.get_xlim()[0], 0.0))
    ax.grid(alpha=0.3)
    # The size key: three reference bubbles, outside the axes so it never covers a model.
    for share in (1.0, 0.5, 0.25):
        ax.scatter(
            [],
            [],
            s=BUBBLE_MAX_AREA * share,
            color="0.8",
            edgecolors="black",
            label=f"{_count(largest * share)} params",
        )
    ax.legend(
        title="model size",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        labelspacing=2.6,
        handletextpad=2.2,
        borderpad=1.6,
        frameon=False,
    )
    points = [
        (m.latency_p50, 100 * m.figures["accuracy"], m.label, colour[m.label]) for m in models
    ]
    place_labels(ax, points, radii)
    return _save(figure, path)


def accuracy_vs_macs(models: list[Model], path: Path) -> Path:
    """Accuracy against MACs with the Pareto front: filled models are on it, hollow ones have a
    model that is at least as accurate for fewer MACs; the shaded region is what the front
    dominates."""
    colour = colours(models)
    points = [(m.figures["macs"] / 1e6, 100 * m.figures["accuracy"]) for m in models]
    front = pareto_front(points)
    # One marker per engine, so the front across engines shows whose models make it up.
    engines = [None if m.is_baseline else engine_name(m.record) for m in models]
    present = [e for e in dict.fromkeys(engines) if e is not None]
    shapes = {e: ENGINE_MARKERS[i % len(ENGINE_MARKERS)] for i, e in enumerate(present)}
    shapes[None] = "*"
    figure, ax = plt.subplots(figsize=(9, 5.6))
    for model, engine, (x, y), on in zip(models, engines, points, front, strict=True):
        ax.scatter(
            x,
            y,
            s=160 if engine is None else 90,
            marker=shapes[engine],
            zorder=3,
            linewidths=1.8,
            edgecolors=colour[model.label],
            facecolors=colour[model.label] if on else "white",
        )
    ax.margins(x=0.2, y=0.2)
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    # The front as a staircase from its cheapest model to the right edge: below and to the
    # right of it, a model is beaten on both axes by one on the front.
    steps = sorted(p for p, on in zip(points, front, strict=True) if on)
    xs = [x for x, _ in steps] + [right]
    ys = [y for _, y in steps] + [steps[-1][1]]
    ax.step(
        xs,
        ys,
        where="post",
        color="black",
        linewidth=1.2,
        linestyle="--",
        zorder=2,
        label="Pareto front",
    )
    ax.fill_between(
        xs, ys, bottom, step="post", color="0.5", alpha=0.08, zorder=1, label="dominated region"
    )
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    for engine, shape in shapes.items():
        name = "baseline" if engine is None else f"pruned by {engine}"
        ax.scatter([], [], s=90, marker=shape, color="0.4", label=name)
    ax.scatter([], [], s=90, color="0.4", label="on the front")
    ax.scatter(
        [], [], s=90, facecolors="white", edgecolors="0.4", linewidths=1.8, label="dominated"
    )
    ax.set(
        xlabel="MACs per image (millions)",
        ylabel="top-1 accuracy (%)",
        title="Accuracy against compute, with the Pareto front",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    labels = [(x, y, m.label, colour[m.label]) for m, (x, y) in zip(models, points, strict=True)]
    place_labels(ax, labels, [6.0] * len(models))
    return _save(figure, path)


def latency_by_batch(models: list[Model], path: Path) -> Path | None:
    """The pruned/baseline latency ratio against batch size, one line per pruned model with its
    95 % intervals, and the model's MACs ratio as a dotted line of its colour: where a line
    meets its dotted line, latency follows the MACs."""
    measured = [m for m in models if not m.is_baseline and m.record.get("latency_by_batch")]
    if not measured:
        return None
    figure, ax = plt.subplots(figsize=(8, 4.8))
    sizes = sorted({row["batch_size"] for m in measured for row in m.record["latency_by_batch"]})
    for model in measured:
        rows = model.record["latency_by_batch"]
        style = line_style(models, model)
        x = [row["batch_size"] for row in rows]
        y = [row["ratio"] for row in rows]
        yerr = [
            [row["ratio"] - row["ci_low"] for row in rows],
            [row["ci_high"] - row["ratio"] for row in rows],
        ]
        ax.errorbar(x, y, yerr=yerr, capsize=3, **style)
        macs = model.record["pruned"]["macs"] / model.record["baseline"]["macs"]
        ax.axhline(macs, color=style["color"], linestyle=":", linewidth=1.2)
    ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1.0, label="baseline (ratio 1)")
    ax.plot([], [], color="0.4", linestyle=":", label="each model's MACs ratio")
    if len(sizes) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    ax.margins(x=0.15)
    device = measured[0].record["pruned"].get("latency_device", "?")
    ax.set(
        xlabel="batch size",
        ylabel="latency, pruned / baseline",
        title=f"Latency ratio against batch size on {device} (95 % intervals)",
    )
    bottom, top = ax.get_ylim()
    ax.set_ylim(min(bottom, 0.0), max(top, 1.1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(figure, path)


def inference_resources(models: list[Model], path: Path) -> Path | None:
    """One panel per series (GPU utilisation and memory on CUDA, CPU and RSS otherwise), one
    line per model, over the seconds each model ran inference alone."""
    device, series = resource_series(models)
    measured = [m for m in models if m.resources]
    series = series[:2]
    if not measured or not series:
        return None
    window = measured[0].record["inference_resources"]
    figure, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], series, strict=True):
        for model in measured:
            values = model.resources.get(key)
            if values:
                ax.plot(model.resources["seconds"], values, **line_style(models, model))
        ax.set(
            xlabel="seconds into the model's inference window",
            ylabel=label,
            title=RESOURCE_TITLES.get(key, label),
        )
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1.0) * 1.08)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    columns = min(len(names), 4)
    figure.legend(handles, names, loc="lower center", ncol=columns, frameon=False)
    figure.suptitle(
        f"Resource use during inference on {device}: each model alone, "
        f"batches of {window['batch_size']}"
    )
    legend_rows = -(-len(names) // columns)
    figure.tight_layout(rect=(0, 0.04 + 0.05 * legend_rows, 1, 1))
    return _save(figure, path)


RESOURCE_TITLES = {
    "process_cpu_percent": "CPU use of this process (100 % = one core)",
    "process_rss_mb": "Resident memory of this process",
    "gpu_utilization_percent": "GPU utilisation (NVML, whole device)",
    "gpu_memory_mb": "GPU memory used (NVML, whole device)",
}


def confusion_matrices(models: list[Model], path: Path) -> Path | None:
    """Each model's confusion matrix, rows normalised to the true class (the diagonal is the
    recall); counts written in the cells when the classes are few."""
    shown = [m for m in models if m.per_class and m.per_class.get("confusion")]
    if not shown:
        return None
    columns = len(shown) if len(shown) <= 4 else 3
    rows = math.ceil(len(shown) / columns)
    classes = len(shown[0].per_class["support"])
    side = 3.6 if classes <= 12 else 4.8
    figure, axes = plt.subplots(
        rows, columns, figsize=(side * columns + 1.2, side * rows + 0.8), squeeze=False
    )
    image = None
    for ax, model in zip(axes.flat, shown, strict=False):
        matrix = model.per_class["confusion"]
        shares = [[100 * c / max(sum(row), 1) for c in row] for row in matrix]
        image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=100)
        ax.set_title(f"{model.label}\ntop-1 {100 * model.figures['accuracy']:.1f} %", fontsize=10)
        ax.set(xlabel="predicted class", ylabel="true class")
        step = 1 if len(matrix) <= 20 else 5
        ticks = list(range(0, len(matrix), step))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=8)
        if len(matrix) <= ANNOTATE_CLASSES:
            for i, row in enumerate(matrix):
                for j, count in enumerate(row):
                    if count:
                        white = shares[i][j] > 55
                        ax.text(
                            j,
                            i,
                            str(count),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if white else "black",
                        )
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    figure.suptitle("Confusion matrices on the test set (cells: images; colour: % of the row)")
    figure.tight_layout(rect=(0, 0, 0.9, 1))
    bar_axes = figure.add_axes((0.92, 0.15, 0.015, 0.7))
    figure.colorbar(image, cax=bar_axes, label="share of the true class (%)")
    return _save(figure, path)


def recall_changes(models: list[Model], path: Path) -> Path | None:
    """Recall change per class (points) of each pruned model against its baseline; `*`: McNemar
    p < 0.05 on that class's images."""
    shown = [m for m in models if not m.is_baseline and m.per_class and m.baseline.per_class]
    if not shown:
        return None
    changes = [class_changes(m) for m in shown]
    values = [[row["recall_change"] for row in rows] for rows in changes]
    classes = len(values[0])
    limit = max([1.0] + [abs(v) for row in values for v in row if not math.isnan(v)])
    width = min(max(6.0, 0.4 * classes + 3), 16.0)
    figure, ax = plt.subplots(figsize=(width, 1.2 + 0.55 * len(shown)))
    image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_yticks(range(len(shown)), [m.label for m in shown], fontsize=9)
    step = 1 if classes <= 40 else 5
    ax.set_xticks(range(0, classes, step))
    ax.set(xlabel="class", title="Recall change per class after pruning (points; * p < 0.05)")
    if classes <= 20:
        for i, rows in enumerate(changes):
            for j, row in enumerate(rows):
                star = "*" if row["p_value"] < SIGNIFICANCE else ""
                dark = abs(row["recall_change"]) > 0.6 * limit
                ax.text(
                    j,
                    i,
                    f"{row['recall_change']:+.0f}{star}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    figure.colorbar(image, ax=ax, label="recall change (points)", fraction=0.04, pad=0.02)
    return _save(figure, path)


def _integer_epochs(ax, last: int) -> None:
    """Whole-number ticks; a single epoch or step otherwise gets ticks like 0.96, 0.98."""
    if last <= 20:
        ax.set_xticks(range(0 if ax.get_xlim()[0] < 0.5 else 1, last + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def finetune_curves(models: list[Model], path: Path) -> Path | None:
    """Train loss and val accuracy per fine-tuning epoch, one line per pruned model; the star
    marks the epoch kept (best val accuracy)."""
    histories = [(m, m.record.get("finetune_history") or []) for m in models if not m.is_baseline]
    histories = [(m, h) for m, h in histories if h]
    if not histories:
        return None
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model, history in histories:
        epochs = [row["epoch"] for row in history]
        style = line_style(models, model)
        loss_ax.plot(epochs, [row["train_loss"] for row in history], **style)
        acc_ax.plot(epochs, [100 * row["val_accuracy"] for row in history], **style)
        best = model.record.get("finetune_best_epoch")
        kept = [row for row in history if row["epoch"] == best]
        if kept:
            acc_ax.scatter(
                best,
                100 * kept[0]["val_accuracy"],
                marker="*",
                s=220,
                color=style["color"],
                edgecolors="black",
                zorder=6,
            )
    last = max(row["epoch"] for _, history in histories for row in history)
    loss_ax.set(title="Fine-tuning: train loss", xlabel="epoch", ylabel="training loss")
    acc_ax.set(
        title="Fine-tuning: val accuracy (★ the epoch kept)", xlabel="epoch", ylabel="accuracy (%)"
    )
    for ax in (loss_ax, acc_ax):
        ax.set_xlim(0.5, last + 0.5)
        _integer_epochs(ax, last)
        ax.grid(alpha=0.3)
    acc_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    return _save(figure, path)


def pruning_steps(models: list[Model], path: Path) -> Path | None:
    """Parameters and val accuracy after each pruning step (before fine-tuning), step 0 being the
    unpruned baseline, one line per pruned model."""
    shown = [
        m for m in models if not m.is_baseline and (m.record.get("pruning") or {}).get("steps")
    ]
    if not shown:
        return None
    figure, (params_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    last, stale_shown = 0, False
    for model in shown:
        steps = model.record["pruning"]["steps"]
        last = max(last, len(steps))
        style = line_style(models, model)
        params = [model.baseline.figures["params"]] + [row["params"] for row in steps]
        params_ax.plot(range(len(params)), [p / 1e6 for p in params], **style)
        history = model.record.get("baseline_history") or []
        # Step 0: the baseline's val accuracy, that of its best epoch (the weights it kept).
        start = [max(row["val_accuracy"] for row in history)] if history else []
        accuracy = start + [row["val_accuracy"] for row in steps]
        acc_ax.plot(range(1 - len(start), len(steps) + 1), [100 * a for a in accuracy], **style)
        # Steps whose BatchNorm statistics were not re-estimated (pruner.recalibrate=last_step):
        # hollow, since their accuracy is that of stale statistics, not of the step.
        stale = [row for row in steps if row.get("batchnorm_reestimated") is False]
        if stale:
            acc_ax.plot(
                [row["step"] for row in stale],
                [100 * row["val_accuracy"] for row in stale],
                linestyle="none",
                marker=style["marker"],
                markersize=style["markersize"],
                markerfacecolor="white",
                markeredgecolor=style["color"],
                zorder=6,
            )
            stale_shown = True
    params_ax.set(
        title="Parameters after each pruning step",
        xlabel="pruning step (0: baseline)",
        ylabel="parameters (millions)",
    )
    if stale_shown:
        acc_ax.text(
            0.0,
            -0.2,
            "hollow: BatchNorm statistics not yet re-estimated (pruner.recalibrate=last_step)",
            transform=acc_ax.transAxes,
            fontsize=8,
            va="top",
        )
    acc_ax.set(
        title="Val accuracy after each step, before fine-tuning",
        xlabel="pruning step (0: baseline)",
        ylabel="accuracy (%)",
    )
    for ax in (params_ax, acc_ax):
        ax.set_xlim(-0.3, last + 0.3)
        _integer_epochs(ax, last)
        ax.grid(alpha=0.3)
    acc_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    return _save(figure, path)
