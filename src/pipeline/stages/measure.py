"""Stage 5: quality, size and speed of a model, and the baseline-vs-pruned comparison."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pipeline.data import StageInputs
from pipeline.inference import inference_model
from pipeline.latency import LatencyStats, measure_latency
from pipeline.model_stats import count_macs, count_params, size_bytes
from pipeline.schema import MeasureSettings
from pipeline.training import evaluate


def quality(model: nn.Module, test_loader: Iterable, inputs: StageInputs) -> dict:
    """Test top-1/top-5/loss plus parameters, MACs and size in bytes."""
    device = inputs.device
    result = evaluate(model.to(device), test_loader, inputs.criterion, device, desc="test")
    return {
        "accuracy": result.accuracy,
        "top5": result.top5,
        "loss": result.loss,
        "test_samples": result.samples,
        "params": count_params(model),
        "macs": count_macs(model, inputs.input_shape),
        "size_bytes": size_bytes(model),
    }


def timed(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    settings: MeasureSettings,
    batch_size: int = 1,
    repeats: int | None = None,
) -> LatencyStats:
    """Latency of the model's inference form (measure.runtime, measure.fold_bn,
    measure.channels_last) with measure.warmup and measure.threads: how the measure stage and
    benchmarks/latency.py time every model, so that their figures agree."""
    prepared = inference_model(
        model.to(device),
        input_shape,
        settings.runtime.value,
        settings.fold_bn,
        settings.channels_last,
    )
    return measure_latency(
        prepared,
        input_shape,
        device,
        batch_size=batch_size,
        warmup=settings.warmup if batch_size == 1 else min(settings.warmup, 3),
        repeats=settings.repeats if repeats is None else repeats,
        threads=settings.threads,
        channels_last=settings.channels_last,
    )


def speed(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    settings: MeasureSettings,
) -> dict:
    """Batch-1 latency percentiles and large-batch throughput on `device`."""
    single = timed(model, input_shape, device, settings)
    batched = timed(
        model,
        input_shape,
        device,
        settings,
        batch_size=settings.throughput_batch_size,
        repeats=settings.throughput_repeats,
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
    inputs: StageInputs,
    settings: MeasureSettings,
) -> dict:
    """Measure both models the same way; the baseline's quality comes from the baseline stage."""
    shape, device = inputs.input_shape, inputs.device
    pruned_quality = quality(pruned_model, inputs.loaders.test, inputs)
    baseline_report = baseline_quality | speed(baseline_model, shape, device, settings)
    pruned_report = pruned_quality | speed(pruned_model, shape, device, settings)
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
