"""Resource usage over time: a background sampler of this process and, on CUDA, the GPU.

MLflow's built-in system metrics already chart machine-wide CPU, memory and (through NVML) GPU
utilisation and memory. What they miss, and what this sampler adds, is this process's own CPU
share and resident memory, PyTorch's CUDA allocator figures, and the per-stage summaries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

MB = 1e6


def nvml_device(torch_index: int, visible: str | None) -> int | str:
    """The NVML device of torch's cuda:`torch_index`: torch counts only the devices that
    CUDA_VISIBLE_DEVICES lists (by index or by UUID), NVML counts every device of the machine.
    An int is an NVML index, a str a UUID."""
    if not visible:
        return torch_index
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    entry = entries[torch_index]
    return int(entry) if entry.isdigit() else entry


class Nvml:
    """Device-wide GPU utilisation and memory of the GPUs a job uses (torch's cuda:0 ..
    cuda:`count`-1 on this node, found through CUDA_VISIBLE_DEVICES); absent (None) without
    NVML or a GPU. The figures are the mean utilisation and the summed memory of those GPUs,
    and each one's under `gpu<n>_...` with n torch's index."""

    def __init__(self, count: int = 1) -> None:
        import os

        self.handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            for index in range(count):
                device = nvml_device(index, visible)
                if isinstance(device, int):
                    self.handles.append(pynvml.nvmlDeviceGetHandleByIndex(device))
                else:
                    self.handles.append(pynvml.nvmlDeviceGetHandleByUUID(device))
            self._pynvml = pynvml
        except Exception:  # no driver, no GPU, no library: GPU series stay absent
            self.handles = []

    @property
    def handle(self):
        return self.handles[0] if self.handles else None

    def read(self) -> dict[str, float]:
        if not self.handles:
            return {}
        values: dict[str, float] = {}
        used, busy = [], []
        for index, handle in enumerate(self.handles):
            utilisation = self._pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = self._pynvml.nvmlDeviceGetMemoryInfo(handle)
            busy.append(float(utilisation.gpu))
            used.append(memory.used / MB)
            if len(self.handles) > 1:
                values[f"gpu{index}_utilization_percent"] = busy[-1]
                values[f"gpu{index}_memory_mb"] = used[-1]
        values["gpu_utilization_percent"] = sum(busy) / len(busy)
        values["gpu_memory_mb"] = sum(used)
        return values


@dataclass
class Sample:
    time: float  # seconds since the epoch
    stage: str | None
    values: dict[str, float]


@dataclass
class ResourceSampler:
    """Samples every `interval` seconds in a daemon thread until stopped.

    `on_sample` receives each sample as it is taken (the tracker logs it to MLflow).
    """

    interval: float = 1.0
    on_sample: Callable[[Sample], None] | None = None
    samples: list[Sample] = field(default_factory=list)
    stage: str | None = None
    gpus: int = 1  # GPUs of this node the job uses (trainer.devices under trainer=ddp)

    def __post_init__(self) -> None:
        self._process = psutil.Process()
        self._cuda = torch.cuda.is_available()
        self._nvml = Nvml(min(self.gpus, torch.cuda.device_count())) if self._cuda else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)
        self._process.cpu_percent(None)  # the first call only sets the reference point

    def start(self) -> ResourceSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5 * self.interval + 1)
        self.sample()  # the closing state, so short stages still get a point

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> Sample:
        values = {
            "process_cpu_percent": self._process.cpu_percent(None),
            "process_rss_mb": self._process.memory_info().rss / MB,
        }
        if self._cuda:
            values["torch_cuda_allocated_mb"] = torch.cuda.memory_allocated() / MB
            values["torch_cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MB
            values |= self._nvml.read()
        sample = Sample(time.time(), self.stage, values)
        self.samples.append(sample)
        if self.on_sample is not None:
            self.on_sample(sample)
        return sample

    def begin_stage(self, name: str) -> None:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self.stage = name
        self.sample()

    def end_stage(self) -> dict[str, float]:
        """Close the current stage and return its summary: peaks and means over its samples."""
        self.sample()
        name, self.stage = self.stage, None
        return summarise([s for s in self.samples if s.stage == name])


def summarise(samples: list[Sample]) -> dict[str, float]:
    def series(key: str) -> list[float]:
        return [s.values[key] for s in samples if key in s.values]

    summary: dict[str, float] = {}
    rules = {
        "peak_rss_mb": ("process_rss_mb", max),
        "mean_process_cpu_percent": ("process_cpu_percent", _mean),
        "peak_gpu_memory_mb": ("gpu_memory_mb", max),
        "mean_gpu_utilization_percent": ("gpu_utilization_percent", _mean),
        "torch_cuda_peak_mb": ("torch_cuda_peak_mb", max),
    }
    for name, (key, reduce) in rules.items():
        values = series(key)
        if values:
            summary[name] = reduce(values)
    return summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
