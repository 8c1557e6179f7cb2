"""PNG plots of one run: training curves and resource usage over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.files import atomic_path  # noqa: E402
from pipeline.measure.resources import Sample


def training_curves(histories: dict[str, list[dict]], path: Path) -> Path | None:
    """Train loss and val accuracy per epoch, one line per training phase (baseline, finetune)."""
    histories = {name: h for name, h in histories.items() if h}
    if not histories:
        return None
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, history), marker in zip(histories.items(), ("o", "s"), strict=False):
        epochs = [row["epoch"] for row in history]
        loss_ax.plot(epochs, [row["train_loss"] for row in history], marker=marker, label=name)
        acc_ax.plot(
            epochs, [100 * row["val_accuracy"] for row in history], marker=marker, label=name
        )
    last = max(row["epoch"] for history in histories.values() for row in history)
    loss_ax.set(title="Train loss per epoch", xlabel="epoch", ylabel="training loss")
    acc_ax.set(title="Val accuracy per epoch", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 102))
    for ax in (loss_ax, acc_ax):
        ax.set_xlim(0.5, last + 0.5)
        # Whole epochs only: a one-epoch run otherwise gets ticks like 0.96, 0.98.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    with atomic_path(path) as staging:
        figure.savefig(staging, dpi=100, format="png")
    plt.close(figure)
    return path


SERIES = [
    ("process_cpu_percent", "process CPU (%)"),
    ("process_rss_mb", "process RSS (MB)"),
    ("gpu_utilization_percent", "GPU utilisation (%)"),
    ("gpu_memory_mb", "GPU memory used (MB)"),
    ("torch_cuda_allocated_mb", "torch CUDA allocated (MB)"),
]


def resource_usage(samples: list[Sample], path: Path) -> Path | None:
    """One panel per series present, over the run's seconds, each stage visit shaded in its
    stage's colour; a legend names the stages (labels on the spans overlapped on short ones)."""
    present = [(key, label) for key, label in SERIES if any(key in s.values for s in samples)]
    if len(samples) < 2 or not present:
        return None
    start = samples[0].time
    figure, axes = plt.subplots(
        len(present), 1, figsize=(10, 2.2 * len(present) + 0.6), sharex=True
    )
    axes = axes if len(present) > 1 else [axes]
    spans = _stage_spans(samples, start)
    palette = plt.get_cmap("tab10").colors
    colour = {
        name: palette[i % len(palette)]
        for i, name in enumerate(dict.fromkeys(name for name, _, _ in spans))
    }
    for ax, (key, label) in zip(axes, present, strict=True):
        points = [(s.time - start, s.values[key]) for s in samples if key in s.values]
        ax.plot(*zip(*points, strict=True), linewidth=1.2, color="black")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        for name, begin, end in spans:
            ax.axvspan(begin, end, alpha=0.18, color=colour[name], linewidth=0)
    handles = [Patch(color=c, alpha=0.35, label=name) for name, c in colour.items()]
    axes[0].legend(
        handles=handles,
        loc="lower left",
        bbox_to_anchor=(0, 1.02),
        ncol=len(handles),
        frameon=False,
        fontsize=8,
        title="stages",
    )
    axes[-1].set_xlabel("seconds since the run started")
    figure.tight_layout()
    with atomic_path(path) as staging:
        figure.savefig(staging, dpi=100, format="png")
    plt.close(figure)
    return path


def _stage_spans(samples: list[Sample], start: float) -> list[tuple[str, float, float]]:
    """(stage, begin, end) of each visit: iterative pruning goes prune, speedup, prune, ...,
    and one span per stage name would cover the others."""
    spans: list[tuple[str | None, float, float]] = []
    for sample in samples:
        moment = sample.time - start
        if spans and spans[-1][0] == sample.stage:
            spans[-1] = (sample.stage, spans[-1][1], moment)
        elif sample.stage:
            spans.append((sample.stage, moment, moment))
        else:
            spans.append((None, moment, moment))
    return [span for span in spans if span[0]]
