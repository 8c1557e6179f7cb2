"""Inference timing with the hygiene every figure here relies on: warm-up, synchronisation on
CUDA (events around each call), a fixed CPU thread count and many repeats summarised by
percentiles. Shared by the measure stage and the benchmarks so their numbers agree."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class LatencyStats:
    p50: float  # milliseconds per call
    p90: float
    mean: float
    stdev: float
    repeats: int
    batch_size: int

    @property
    def throughput(self) -> float:
        """Images per second at the median call time."""
        return self.batch_size / (self.p50 / 1000.0)

    def as_dict(self) -> dict:
        return asdict(self) | {"throughput": self.throughput}


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Pin torch's intra-op thread count for the duration, then restore it."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def busy_cores(window_s: float = 0.5) -> int:
    """How many CPUs other processes kept busy over `window_s` seconds while this one slept."""
    import psutil

    cpus = os.cpu_count() or 1
    own = psutil.Process()
    own.cpu_percent(None)
    machine = psutil.cpu_percent(interval=window_s)  # percent of all CPUs together
    others = max(0.0, machine * cpus - own.cpu_percent(None)) / 100.0
    return min(cpus, int(others + 0.5))


def stats_of(times_ms: list[float], batch_size: int) -> LatencyStats:
    return LatencyStats(
        p50=float(np.percentile(times_ms, 50)),
        p90=float(np.percentile(times_ms, 90)),
        mean=statistics.fmean(times_ms),
        stdev=statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0,
        repeats=len(times_ms),
        batch_size=batch_size,
    )


class CallTimer:
    """Milliseconds of one forward pass of `model` on a fixed random batch: CUDA events around
    the call on a GPU, the wall clock on the CPU."""

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...],
        device: torch.device,
        batch_size: int,
        channels_last: bool,
    ) -> None:
        self.model = model.eval().to(device)
        self.batch = torch.randn(batch_size, *input_shape, device=device)
        if channels_last:
            self.batch = self.batch.contiguous(memory_format=torch.channels_last)
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.model(self.batch)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        began = time.perf_counter()
        self.model(self.batch)
        return (time.perf_counter() - began) * 1000.0

    def warm_up(self, calls: int) -> None:
        for _ in range(calls):
            self.model(self.batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class PairedLatency:
    baseline: LatencyStats
    pruned: LatencyStats
    baseline_rounds: list[list[float]]  # milliseconds per call, round by round
    pruned_rounds: list[list[float]]


@torch.inference_mode()
def measure_latency_pair(
    baseline: nn.Module,
    pruned: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    batch_size: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    rounds: int = 10,
    threads: int | None = None,
    channels_last: bool = False,
) -> PairedLatency:
    """Time two models in alternating rounds in this process and thread pool: each round
    times ceil(repeats / rounds) calls of one model, then as many of the other, and the next
    round starts with the other model. Both are warmed up first. Load that comes and goes then
    lands on both models of a round, and the per-round ratios (pipeline.measure.uncertainty)
    show how much it moved them."""
    timers = {
        "baseline": CallTimer(baseline, input_shape, device, batch_size, channels_last),
        "pruned": CallTimer(pruned, input_shape, device, batch_size, channels_last),
    }
    per_round = max(1, -(-repeats // rounds))
    times: dict[str, list[list[float]]] = {"baseline": [], "pruned": []}
    with cpu_threads(threads):
        for timer in timers.values():
            timer.warm_up(warmup)
        for index in range(rounds):
            order = ("baseline", "pruned") if index % 2 == 0 else ("pruned", "baseline")
            for name in order:
                times[name].append([timers[name]() for _ in range(per_round)])
    flat = {name: [t for chunk in chunks for t in chunk] for name, chunks in times.items()}
    return PairedLatency(
        stats_of(flat["baseline"], batch_size),
        stats_of(flat["pruned"], batch_size),
        times["baseline"],
        times["pruned"],
    )
