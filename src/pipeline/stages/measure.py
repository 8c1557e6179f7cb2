"""Stage 5: quality, size and speed of a model, and the baseline-vs-pruned comparison.

Both models are evaluated on the same test images and timed in alternating rounds, so that the
accuracy change and the latency ratio come with the uncertainty of a paired comparison
(pipeline.uncertainty)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from pipeline.data import StageInputs
from pipeline.inference import inference_model
from pipeline.latency import (
    LatencyStats,
    PairedLatency,
    busy_cores,
    measure_latency_pair,
)
from pipeline.model_stats import count_macs, count_params, size_bytes
from pipeline.schema import MeasureSettings
from pipeline.training import evaluate
from pipeline.uncertainty import accuracy_change, latency_ratio

# A latency interval wider than this (high / low) says the machine was too busy to trust.
NOISY_INTERVAL = 1.2


def quality(model: nn.Module, test_loader: Iterable, inputs: StageInputs) -> dict:
    """Test top-1/top-5/loss plus parameters, MACs and size in bytes; `correct` holds whether
    each test image was classified right (for the paired comparison)."""
    device = inputs.device
    result = evaluate(model.to(device), test_loader, inputs.criterion, device, desc="test")
    return {
        "accuracy": result.accuracy,
        "top5": result.top5,
        "loss": result.loss,
        "test_samples": result.samples,
        "correct": result.correct,
        "params": count_params(model),
        "macs": count_macs(model, inputs.input_shape),
        "size_bytes": size_bytes(model),
    }


def prepared(model: nn.Module, input_shape: tuple[int, ...], device, settings: MeasureSettings):
    """The model's inference form: measure.runtime, measure.fold_bn, measure.channels_last."""
    return inference_model(
        model.to(device),
        input_shape,
        settings.runtime.value,
        settings.fold_bn,
        settings.channels_last,
    )


def timed_pair(
    baseline: nn.Module,
    pruned: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    settings: MeasureSettings,
    batch_size: int = 1,
    repeats: int | None = None,
) -> PairedLatency:
    """Both models' inference forms timed in alternating rounds (measure.rounds): how the
    measure stage and benchmarks/latency.py time every pair, so that their figures agree."""
    return _time_prepared(
        prepared(baseline, input_shape, device, settings),
        prepared(pruned, input_shape, device, settings),
        input_shape,
        device,
        settings,
        batch_size,
        repeats,
    )


def _time_prepared(
    baseline: nn.Module,
    pruned: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    settings: MeasureSettings,
    batch_size: int,
    repeats: int | None,
) -> PairedLatency:
    """timed_pair on models already in their inference form."""
    repeats = settings.repeats if repeats is None else repeats
    return measure_latency_pair(
        baseline,
        pruned,
        input_shape,
        device,
        batch_size=batch_size,
        warmup=_warmup(settings, batch_size),
        repeats=repeats,
        rounds=min(settings.rounds, repeats),
        threads=settings.threads,
        channels_last=settings.channels_last,
    )


def _warmup(settings: MeasureSettings, batch_size: int) -> int:
    return settings.warmup if batch_size == 1 else min(settings.warmup, 3)


def _latency_report(stats: LatencyStats) -> dict:
    return {"p50": stats.p50, "p90": stats.p90, "mean": stats.mean, "stdev": stats.stdev}


def speed(
    baseline: nn.Module,
    pruned: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    settings: MeasureSettings,
) -> tuple[dict, dict, dict]:
    """Batch-1 latency and large-batch throughput of both models, timed in alternating rounds;
    returns each model's figures and the comparison (ratio, interval, load)."""
    load_before = os.getloadavg()[0]
    # Other work on the CPUs (a second job, a build) stalls the threads of every layer; the
    # ratio then says more about layer counts than about widths. Say so instead of hiding it.
    busy = busy_cores() if device.type == "cpu" else 0
    # Prepared once (a BN-folded copy, traced and frozen with jit_freeze) for both timings.
    baseline, pruned = (prepared(m, input_shape, device, settings) for m in (baseline, pruned))
    single = _time_prepared(baseline, pruned, input_shape, device, settings, 1, None)
    batched = _time_prepared(
        baseline,
        pruned,
        input_shape,
        device,
        settings,
        batch_size=settings.throughput_batch_size,
        repeats=settings.throughput_repeats,
    )
    load_after = os.getloadavg()[0]
    common = {
        "latency_device": device.type,
        "runtime": {
            "name": settings.runtime.value,
            "fold_bn": settings.fold_bn,
            "channels_last": settings.channels_last,
        },
        "threads": torch.get_num_threads() if settings.threads is None else settings.threads,
    }
    ratio = latency_ratio(single.baseline_rounds, single.pruned_rounds)
    ratio["noisy"] = bool(ratio["ci_high"] / ratio["ci_low"] > NOISY_INTERVAL or busy > 0)
    ratio["load_average"] = {"before": load_before, "after": load_after, "cpus": os.cpu_count()}
    ratio["busy_cores"] = busy
    sides = [
        {"latency_ms": _latency_report(stats), "throughput": many.throughput} | common
        for stats, many in ((single.baseline, batched.baseline), (single.pruned, batched.pruned))
    ]
    return sides[0], sides[1], ratio


def reduction_pct(baseline: float, pruned: float) -> float:
    return 100.0 * (baseline - pruned) / baseline if baseline else 0.0


def measure(
    baseline_model: nn.Module,
    baseline_quality: dict,
    pruned_model: nn.Module,
    test_loader: Iterable,
    inputs: StageInputs,
    settings: MeasureSettings,
    seed: int = 0,
) -> dict:
    """Measure both models the same way, on the same test images as the baseline's quality."""
    pruned_quality = quality(pruned_model, test_loader, inputs)
    base_speed, pruned_speed, ratio = speed(
        baseline_model, pruned_model, inputs.input_shape, inputs.device, settings
    )
    change = accuracy_change(
        baseline_quality.pop("correct"), pruned_quality.pop("correct"), seed=seed
    )
    baseline_report = baseline_quality | base_speed
    pruned_report = pruned_quality | pruned_speed
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
        "accuracy_change": change,
        "latency_ratio": ratio,
    }
