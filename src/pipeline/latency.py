"""Inference timing with the hygiene every figure here relies on: warm-up, synchronisation on
CUDA (events around each call), a fixed CPU thread count and many repeats summarised by
percentiles. Shared by the measure stage and the benchmarks so their numbers agree."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    batch_size: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
    channels_last: bool = False,
) -> LatencyStats:
    """Time `repeats` forward passes of a random batch after `warmup` untimed ones."""
    model = model.eval().to(device)
    batch = torch.randn(batch_size, *input_shape, device=device)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    times_ms: list[float] = []
    with cpu_threads(threads):
        for _ in range(warmup):
            model(batch)
        if cuda:
            torch.cuda.synchronize(device)
        for _ in range(repeats):
            if cuda:
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                model(batch)
                end.record()
                end.synchronize()
                times_ms.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                model(batch)
                times_ms.append((time.perf_counter() - began) * 1000.0)
    return LatencyStats(
        p50=percentile(times_ms, 0.5),
        p90=percentile(times_ms, 0.9),
        mean=statistics.fmean(times_ms),
        stdev=statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0,
        repeats=repeats,
        batch_size=batch_size,
    )
