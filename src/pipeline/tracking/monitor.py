"""Stage timing and resource sampling for a whole run, whatever tracking is on: the run record
and the plots always get them; a tracker, when there is one, is told as they happen."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from pipeline.measure.resources import ResourceSampler, Sample
from pipeline.tracking.tracker import NullTracker, Tracker

log = logging.getLogger(__name__)


class StageMonitor:
    """`with StageMonitor(...) as monitor:` samples every `interval` seconds until the block
    ends; `with monitor.stage(name):` times one stage and summarises its samples."""

    def __init__(self, interval: float, tracker: Tracker | None = None, gpus: int = 1) -> None:
        self.tracker = tracker or NullTracker()
        self.sampler = ResourceSampler(
            interval=interval, on_sample=self.tracker.log_sample, gpus=gpus
        )
        self.stage_seconds: dict[str, dict[str, float]] = {}
        self.stage_summaries: dict[str, dict[str, float]] = {}

    def __enter__(self) -> StageMonitor:
        self.sampler.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.sampler.stop()

    @property
    def samples(self) -> list[Sample]:
        return self.sampler.samples

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage, tag its status, and log its duration and resource use."""
        self.sampler.begin_stage(name)
        began = time.perf_counter()
        status = "failed"
        try:
            # Inside the try: an interrupt while the tag is written still ends the stage failed.
            self.tracker.set_tags({f"stage.{name}": "running"})
            log.info("stage %s: start", name)
            yield
            status = "finished"
        finally:
            seconds = time.perf_counter() - began
            log.info("stage %s: %s after %.1f s", name, status, seconds)
            # A stage entered again (iterative pruning) adds up; the sampler's summary already
            # covers every visit, as it groups samples by stage name.
            total = self.stage_seconds.get(name, {}).get("seconds", 0.0) + seconds
            self.stage_seconds[name] = {"seconds": total}
            summary = self.sampler.end_stage()
            self.stage_summaries[name] = summary
            self.tracker.set_tags({f"stage.{name}": status})
            self.tracker.log_metrics(
                {f"stage.{name}.seconds": total}
                | {f"stage.{name}.{key}": value for key, value in summary.items()}
            )
