"""Stage 5: quality, size and speed of a model, and the baseline-vs-pruned comparison."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from pipeline.inference import inference_model
from pipeline.latency import measure_latency
from pipeline.model_stats import count_macs, count_params, size_bytes
from pipeline.schema import MeasureSchema
from pipeline.training import evaluate


def quality(
    model: nn.Module,
    test_loader: Iterable,
    criterion: Callable,
    device: torch.device,
    input_shape: tuple[int, int, int],
    max_batches: int | None = None,
) -> dict:
    """Test top-1/top-5/loss plus parameters, MACs and size in bytes."""
    result = evaluate(model.to(device), test_loader, criterion, device, max_batches, desc="test")
    return {
        "accuracy": result.accuracy,
        "top5": result.top5,
        "loss": result.loss,
        "test_samples": result.samples,
        "params": count_params(model),
        "macs": count_macs(model, input_shape),
        "size_bytes": size_bytes(model),
    }


def speed(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
    settings: MeasureSchema,
) -> dict:
    """Batch-1 latency percentiles and large-batch throughput on `device`, timed on the
    inference form of the model (measure.runtime, measure.fold_bn, measure.channels_last)."""
    model = inference_model(
        model.to(device),
        input_shape,
        settings.runtime.value,
        settings.fold_bn,
        settings.channels_last,
    )
    timing = {"threads": settings.threads, "channels_last": settings.channels_last}
    single = measure_latency(
        model, input_shape, device, 1, settings.warmup, settings.repeats, **timing
    )
    batched = measure_latency(
        model,
        input_shape,
        device,
        settings.throughput_batch_size,
        min(settings.warmup, 3),
        settings.throughput_repeats,
        **timing,
    )
    return {
        "latency_ms": {
            "p50": single.p50,
            "p90": single.p90,
            "mean": single.mean,
            "stdev": single.stdev,
        },
        "throughput": batched.throughput,
        "latency_device": device.type,
        "runtime": {
            "name": settings.runtime.value,
            "fold_bn": settings.fold_bn,
            "channels_last": settings.channels_last,
        },
        "threads": torch.get_num_threads() if settings.threads is None else settings.threads,
    }


def reduction_pct(baseline: float, pruned: float) -> float:
    return 100.0 * (baseline - pruned) / baseline if baseline else 0.0


def measure(
    baseline_model: nn.Module,
    baseline_quality: dict,
    pruned_model: nn.Module,
    test_loader: Iterable,
    criterion: Callable,
    device: torch.device,
    input_shape: tuple[int, int, int],
    settings: MeasureSchema,
    max_batches: int | None = None,
) -> dict:
    """Measure both models the same way; the baseline's quality comes from the baseline stage."""
    pruned_quality = quality(pruned_model, test_loader, criterion, device, input_shape, max_batches)
    baseline_report = baseline_quality | speed(baseline_model, input_shape, device, settings)
    pruned_report = pruned_quality | speed(pruned_model, input_shape, device, settings)
    reductions = {
        key: reduction_pct(baseline_report[key], pruned_report[key])
        for key in ("params", "macs", "size_bytes")
    }
    reductions["latency_p50"] = reduction_pct(
        baseline_report["latency_ms"]["p50"], pruned_report["latency_ms"]["p50"]
    )
    return {
        "baseline": baseline_report,
        "pruned": pruned_report,
        "reduction_pct": reductions,
        "accuracy_drop_points": 100.0 * (baseline_report["accuracy"] - pruned_report["accuracy"]),
    }
