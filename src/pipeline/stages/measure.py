"""Stage 5: quality, size and speed of a model, and the baseline-vs-pruned comparison.

Both models are evaluated on the same test images and timed in alternating rounds, so that the
accuracy change and the latency ratio come with the uncertainty of a paired comparison
(pipeline.measure.uncertainty). The stage also keeps, for the comparison report
(pipeline.report), each model's per-class counts on those images and its resource use while
it runs inference alone (see `inference_resources` for why alone and not during the paired
rounds)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import torch
from torch import nn

from pipeline.config.schema import MeasureSettings
from pipeline.data.datasets import StageInputs
from pipeline.measure.latency import (
    CallTimer,
    LatencyStats,
    PairedLatency,
    busy_cores,
    cpu_threads,
    measure_latency_pair,
)
from pipeline.measure.resources import ResourceSampler
from pipeline.measure.runtime_forms import OnnxRuntimeModel, inference_model, runtime_versions
from pipeline.measure.uncertainty import accuracy_change, latency_ratio, pack_outcomes
from pipeline.models.stats import count_macs, count_params, size_bytes
from pipeline.training.loop import evaluate

# A latency interval wider than this (high / low) says the machine was too busy to trust.
NOISY_INTERVAL = 1.2
# Each model's resource window: long enough for NVML, whose utilisation figure averages over
# 1/6 s to 1 s depending on the GPU, to see the model alone; short beside a run (2 s in all).
RESOURCE_WINDOW_S = 1.0
# CPU times tick every 10 ms: a shorter interval would read the process CPU share in steps of
# more than 10 %.
RESOURCE_INTERVAL_S = 0.1
RESOURCE_MIN_CALLS = 3
# Above this many classes the confusion matrix is not stored (its size grows as the square);
# the per-class counts, which the precision/recall table needs, always are.
MAX_CONFUSION_CLASSES = 50
# measure.batch_sizes when it is null: on a GPU a small model is launch-bound at batch 1, so
# pruning shows at larger batches; on the CPU batch 1 already follows the MACs.
DEFAULT_BATCH_SIZES = {"cpu": (1,), "cuda": (1, 8, 64)}
SIDES = ("baseline", "pruned")
# What `quality` gives per test image (and the class count), beside its summary figures.
OUTCOME_KEYS = ("correct", "predicted", "labels", "classes")


def quality(
    model: nn.Module,
    test_loader: Iterable,
    inputs: StageInputs,
    settings: MeasureSettings | None = None,
) -> dict:
    """Test top-1/top-5/loss plus parameters, MACs and size in bytes; `correct`, `predicted`
    and `labels` hold each test image's outcome (for the paired comparison and the per-class
    counts; `measure` keeps them out of the record). With measure.precision other than fp32
    the accuracy is that of the form that is timed (cast, BatchNorm folded as measure.fold_bn
    says); parameters, MACs and size are the fp32 model's."""
    device = inputs.device
    evaluated = model.to(device)
    if settings is not None and settings.precision.value != "fp32":
        evaluated = inference_model(
            evaluated,
            inputs.input_shape,
            fold_bn=settings.fold_bn,
            precision=settings.precision.value,
        )
    result = evaluate(evaluated, test_loader, inputs.criterion, device, desc="test")
    return {
        "accuracy": result.accuracy,
        "top5": result.top5,
        "loss": result.loss,
        "test_samples": result.samples,
        "correct": result.correct,
        "predicted": result.predicted,
        "labels": result.labels,
        "classes": result.classes,
        "params": count_params(model),
        "macs": count_macs(model, inputs.input_shape),
        "size_bytes": size_bytes(model),
    }


def prepared(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device,
    settings: MeasureSettings,
    batch_sizes: tuple[int, ...] = (1,),
):
    """The model's inference form: measure.runtime, measure.fold_bn, measure.channels_last (and
    measure.threads for onnxruntime's session), ready for the batch sizes it will be timed at."""
    return inference_model(
        model.to(device),
        input_shape,
        settings.runtime.value,
        settings.fold_bn,
        settings.channels_last,
        settings.threads,
        batch_sizes,
        settings.precision.value,
    )


def prepared_pair(
    baseline: nn.Module,
    pruned: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    settings: MeasureSettings,
    batch_sizes: tuple[int, ...] = (1,),
) -> dict[str, nn.Module]:
    """Both models' inference forms, prepared together for one comparison at `batch_sizes`."""
    if settings.runtime.value in ("compile", "cudagraphs"):
        # Dynamo keeps compiled graphs per code object, shared by every model of one class, up
        # to a recompile limit past which it runs eager (a log warning only): a benchmark's rows
        # or sweep jobs in one process would reach it. Forms of an earlier pair are not timed
        # again, so their graphs can go.
        torch.compiler.reset()
    return {
        "baseline": prepared(baseline, input_shape, device, settings, batch_sizes),
        "pruned": prepared(pruned, input_shape, device, settings, batch_sizes),
    }


def timed_pair(
    baseline: nn.Module,
    pruned: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    settings: MeasureSettings,
    batch_size: int = 1,
    repeats: int | None = None,
) -> tuple[PairedLatency, dict[str, float | None] | None]:
    """Both models' inference forms timed in alternating rounds (measure.rounds): how the
    measure stage, the latency budget and benchmarks/latency.py time every pair, so that their
    figures agree; and on CUDA each form's peak memory of a call at `batch_size` (MiB; None
    elsewhere)."""
    forms = prepared_pair(baseline, pruned, input_shape, device, settings, (batch_size,))
    pair = _time_prepared(
        forms["baseline"],
        forms["pruned"],
        input_shape,
        device,
        settings,
        batch_size,
        repeats,
    )
    if device.type != "cuda":
        return pair, None
    return pair, peak_memory_pair(forms, input_shape, device, batch_size, settings.channels_last)


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


def measured_batch_sizes(settings: MeasureSettings, device: torch.device) -> tuple[int, ...]:
    """measure.batch_sizes in ascending order, or the device's default when it is null."""
    chosen = settings.batch_sizes or DEFAULT_BATCH_SIZES.get(device.type, (1,))
    return tuple(sorted(int(b) for b in chosen))


def speed(
    baseline: nn.Module,
    pruned: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    settings: MeasureSettings,
    busy: int = 0,
) -> tuple[dict, dict, dict, list[dict]]:
    """Latency at each of measure.batch_sizes and large-batch throughput of both models
    (already in their inference form, `prepared`), timed in alternating rounds; returns each
    model's figures at the smallest batch size, their comparison there (ratio, interval, load)
    and one row per batch size (both models' latency, the ratio and its interval; on CUDA the
    peak memory of a call). `busy`: CPUs other processes kept busy just before."""
    load_before = os.getloadavg()[0]
    sizes = measured_batch_sizes(settings, device)
    timings = {
        size: _time_prepared(baseline, pruned, input_shape, device, settings, size, None)
        for size in sizes
    }
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
        "latency_batch_size": sizes[0],
        "runtime": {
            "name": settings.runtime.value,
            "fold_bn": settings.fold_bn,
            "channels_last": settings.channels_last,
            "precision": settings.precision.value,
        }
        | runtime_versions(baseline),
        "threads": torch.get_num_threads() if settings.threads is None else settings.threads,
    }
    rows = []
    for size, timing in timings.items():
        row = {"batch_size": size} | latency_ratio(timing.baseline_rounds, timing.pruned_rounds)
        row["noisy"] = bool(row["ci_high"] / row["ci_low"] > NOISY_INTERVAL or busy > 0)
        row["baseline_ms"] = _latency_report(timing.baseline)
        row["pruned_ms"] = _latency_report(timing.pruned)
        if device.type == "cuda":
            forms = {"baseline": baseline, "pruned": pruned}
            row["peak_memory_mb"] = peak_memory_pair(
                forms, input_shape, device, size, settings.channels_last
            )
        rows.append(row)
    first = timings[sizes[0]]
    ratio = {k: v for k, v in rows[0].items() if k not in ("baseline_ms", "pruned_ms")}
    ratio["load_average"] = {"before": load_before, "after": load_after, "cpus": os.cpu_count()}
    ratio["busy_cores"] = busy
    sides = [
        {"latency_ms": _latency_report(stats), "throughput": many.throughput} | common
        for stats, many in ((first.baseline, batched.baseline), (first.pruned, batched.pruned))
    ]
    return sides[0], sides[1], ratio, rows


def peak_memory_pair(
    forms: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    device: torch.device,
    batch_size: int,
    channels_last: bool,
) -> dict[str, float | None]:
    """peak_memory_mb of each of a pair's forms ({"baseline": ..., "pruned": ...})."""
    return {
        side: peak_memory_mb(form, input_shape, device, batch_size, channels_last)
        for side, form in forms.items()
    }


@torch.inference_mode()
def peak_memory_mb(
    form: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    batch_size: int,
    channels_last: bool,
) -> float | None:
    """Peak CUDA memory of one call at `batch_size`, in MiB: the memory the form holds (its
    weights, the input batch) plus the most PyTorch's allocator held beyond it during the call
    (activations, workspace). None for onnxruntime, whose own arena PyTorch does not see."""
    if isinstance(form, OnnxRuntimeModel):
        return None
    timer = CallTimer(form, input_shape, device, batch_size, channels_last)
    timer()  # lazy initialisation (cuDNN plans, compiled graphs) is not the model's memory
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    held = held_bytes(form) + timer.batch.numel() * timer.batch.element_size()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    timer()
    torch.cuda.synchronize(device)
    return (held + torch.cuda.max_memory_allocated(device) - before) / 2**20


def held_bytes(form: nn.Module) -> int:
    """The bytes of a form's weights and buffers; a frozen TorchScript form keeps them as
    tensor constants of its graph, which it does not list as parameters."""
    tensors = [*form.parameters(), *form.buffers()]
    if not tensors and isinstance(form, torch.jit.ScriptModule):
        constants = form.graph.findAllNodes("prim::Constant")
        outputs = [node.output() for node in constants]
        tensors = [o.toIValue() for o in outputs if o.type().kind() == "TensorType"]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def inference_resources(
    models: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    device: torch.device,
    settings: MeasureSettings,
) -> dict:
    """Each model's resource use over time while it runs inference alone.

    The latency timing cannot give this: it alternates rounds of both models, each a few tens
    of milliseconds, far shorter than a resource sample (and than NVML's own averaging), so a
    sample there would mix the two. Instead, after the paired timing, each model in turn runs
    throughput batches (measure.throughput_batch_size, as the throughput pass) on its own for
    RESOURCE_WINDOW_S (at least RESOURCE_MIN_CALLS calls), under measure.threads, sampled every
    RESOURCE_INTERVAL_S by a ResourceSampler of its own: process CPU and RSS, and on CUDA NVML's
    device-wide GPU utilisation and memory and PyTorch's allocated/peak memory. Series are
    stored column-wise, `seconds` since the window began."""
    batch_size = settings.throughput_batch_size
    windows: dict = {
        "window": "each model alone after the paired timing, throughput batches",
        "batch_size": batch_size,
        "interval_s": RESOURCE_INTERVAL_S,
        "device": device.type,
    }
    for name, model in models.items():
        timer = CallTimer(model, input_shape, device, batch_size, settings.channels_last)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sampler = ResourceSampler(interval=RESOURCE_INTERVAL_S)
        with cpu_threads(settings.threads):
            began = time.time()
            sampler.start()
            calls = 0
            while calls < RESOURCE_MIN_CALLS or time.time() - began < RESOURCE_WINDOW_S:
                timer()
                calls += 1
            sampler.stop()
        windows[name] = _columns(sampler.samples, began) | {"calls": calls}
    return windows


def _columns(samples: list, began: float) -> dict[str, list[float]]:
    """Samples as one list per series, rounded: small in measurements.json."""
    columns: dict[str, list[float]] = {"seconds": [round(s.time - began, 3) for s in samples]}
    for key in dict.fromkeys(key for s in samples for key in s.values):
        columns[key] = [round(s.values.get(key, float("nan")), 2) for s in samples]
    return columns


def per_class(labels: list[int], baseline: dict, pruned: dict, classes: int) -> dict:
    """Per-class counts of both models on the same test images: support, correct and
    predicted per class, the images of each class only one model gets right (for a paired test
    per class), and the confusion matrices (rows: true class) up to MAX_CONFUSION_CLASSES."""
    truth = torch.tensor(labels, dtype=torch.long)
    classes = max(classes, int(truth.max()) + 1 if len(labels) else 0)

    def counts(predicted: list[int]) -> dict:
        guess = torch.tensor(predicted, dtype=torch.long)
        matrix = torch.zeros(classes, classes, dtype=torch.long)
        matrix.index_put_((truth, guess), torch.ones_like(truth), accumulate=True)
        return {
            "correct": matrix.diagonal().tolist(),
            "predicted": matrix.sum(dim=0).tolist(),
            "confusion": matrix.tolist() if classes <= MAX_CONFUSION_CLASSES else None,
        }

    base_right = torch.tensor(baseline["correct"], dtype=torch.bool)
    pruned_right = torch.tensor(pruned["correct"], dtype=torch.bool)

    def by_class(mask: torch.Tensor) -> list[int]:
        return torch.bincount(truth[mask], minlength=classes).tolist()

    return {
        "classes": classes,
        "support": torch.bincount(truth, minlength=classes).tolist(),
        "only_baseline_right": by_class(base_right & ~pruned_right),
        "only_pruned_right": by_class(pruned_right & ~base_right),
        "baseline": counts(baseline["predicted"]),
        "pruned": counts(pruned["predicted"]),
    }


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
    pruned_quality = quality(pruned_model, test_loader, inputs, settings)
    device, shape = inputs.device, inputs.input_shape
    # Other work on the CPUs (a second job, a build) stalls the threads of every layer; the
    # ratio then says more about layer counts than about widths. Say so instead of hiding it.
    busy = busy_cores() if device.type == "cpu" else 0
    # Prepared once (a BN-folded copy, traced and frozen with jit_freeze, exported to ONNX or
    # compiled) for every timing: batch-1 latency, then throughput and resource windows.
    batch_sizes = (*measured_batch_sizes(settings, device), settings.throughput_batch_size)
    forms = prepared_pair(baseline_model, pruned_model, shape, device, settings, batch_sizes)
    base_speed, pruned_speed, ratio, by_batch = speed(
        forms["baseline"], forms["pruned"], shape, device, settings, busy
    )
    resources = inference_resources(forms, shape, device, settings)
    # Each image's outcome feeds the paired comparison and the per-class counts; the record
    # keeps those, not the per-image lists.
    qualities = (baseline_quality, pruned_quality)
    outcomes = [{key: q[key] for key in OUTCOME_KEYS} for q in qualities]
    summaries = [{k: v for k, v in q.items() if k not in OUTCOME_KEYS} for q in qualities]
    change = accuracy_change(outcomes[0]["correct"], outcomes[1]["correct"], seed=seed)
    classes = per_class(outcomes[0]["labels"], *outcomes, classes=outcomes[0]["classes"])
    baseline_report = summaries[0] | base_speed
    pruned_report = summaries[1] | pruned_speed
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
        "latency_by_batch": by_batch,
        "per_class": classes,
        "inference_resources": resources,
        # Each test image's correctness, packed: runs measured on the same images can be
        # compared pairwise later (benchmarks/recipe_table.py does, between recipes).
        "outcomes": {
            side: pack_outcomes(o["correct"]) for side, o in zip(SIDES, outcomes, strict=True)
        },
    }
