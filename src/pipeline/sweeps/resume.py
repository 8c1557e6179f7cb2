"""Resume: before a job runs, whether the same job (the same config_identity) already finished,
in the tracking store when tracking is on, else among the run folders under the output root."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.schema import RunSettings
from pipeline.sweeps.outcomes import RECORD_FILE
from pipeline.tracking.mlflow_tracker import finished_run_record


@dataclass
class Finished:
    """An earlier run of the same job: its record, and where it was found."""

    record: dict
    where: str  # an MLflow run id or a measurements.json path
    address: str | None = None  # where to open the MLflow run


def finished_before(settings: RunSettings, identity: str) -> Finished | None:
    """The latest FINISHED run with this identity: in the tracking store when tracking is on,
    else among the measurements.json files of the run folders under paths.output_root (the
    folders Hydra made, with their .hydra/; not MLflow's copies of the files)."""
    if settings.tracking.enabled:
        found = finished_run_record(settings.tracking, settings.paths.output_root, identity)
        return Finished(*found) if found else None
    candidates = sorted(
        Path(settings.paths.output_root).glob(f"*/**/{RECORD_FILE}"),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for path in candidates:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("config_identity") == identity and (path.parent / ".hydra").is_dir():
            return Finished(record, str(path))
    return None
