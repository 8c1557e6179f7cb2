"""PNG plots of one run: training curves and resource usage over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.resources import Sample  # noqa: E402


def training_curves(histories: dict[str, list[dict]], path: Path) -> Path | None:
    """Train loss and val accuracy per epoch, one line per training phase (baseline, finetune)."""
    histories = {name: h for name, h in histories.items() if h}
    if not histories:
        return None
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, history in histories.items():
        epochs = [row["epoch"] for row in history]
        loss_ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label=name)
        acc_ax.plot(epochs, [row["val_accuracy"] for row in history], marker="o", label=name)
    loss_ax.set(title="train loss", xlabel="epoch")
    acc_ax.set(title="val accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
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
    """One panel per series present, with each stage shaded and named."""
    present = [(key, label) for key, label in SERIES if any(key in s.values for s in samples)]
    if len(samples) < 2 or not present:
        return None
    start = samples[0].time
    figure, axes = plt.subplots(len(present), 1, figsize=(10, 2.2 * len(present)), sharex=True)
    axes = axes if len(present) > 1 else [axes]
    spans = _stage_spans(samples, start)
    for ax, (key, label) in zip(axes, present, strict=True):
        points = [(s.time - start, s.values[key]) for s in samples if key in s.values]
        ax.plot(*zip(*points, strict=True), linewidth=1.2)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        for index, (_name, begin, end) in enumerate(spans):
            ax.axvspan(begin, end, alpha=0.08 if index % 2 else 0.16, color="tab:blue")
    for name, begin, end in spans:
        axes[0].text(
            (begin + end) / 2, axes[0].get_ylim()[1], name, ha="center", va="bottom", fontsize=8
        )
    axes[-1].set_xlabel("seconds since start")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _stage_spans(samples: list[Sample], start: float) -> list[tuple[str, float, float]]:
    spans: dict[str, list[float]] = {}
    for sample in samples:
        if sample.stage:
            spans.setdefault(sample.stage, []).append(sample.time - start)
    return [(name, min(times), max(times)) for name, times in spans.items()]
