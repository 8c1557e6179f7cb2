"""What a run tells its tracker: a small protocol, so that a run never asks "is tracking on?".
MlflowTracker (pipeline.tracking.mlflow_tracker) records it all; NullTracker ignores it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.measure.resources import Sample

if TYPE_CHECKING:
    from pipeline.tracking.logged_model import ModelToLog


class Tracker(Protocol):
    """What a run tells its tracker; NullTracker ignores it all, MlflowTracker records it."""

    def log_params(self, params: dict[str, str]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_dataset(self, dataset: dict) -> None: ...

    def log_sample(self, sample: Sample) -> None: ...

    def log_model(self, model: ModelToLog, run_dir: Path) -> dict[str, dict[str, str]]: ...


class NullTracker:
    """tracking=none: nothing is recorded beyond the run directory."""

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, dataset: dict) -> None:
        pass

    def log_sample(self, sample: Sample) -> None:
        pass

    def log_model(self, model: ModelToLog, run_dir: Path) -> dict[str, dict[str, str]]:
        return {}
