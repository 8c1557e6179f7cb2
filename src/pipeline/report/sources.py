"""Where a report's runs come from: measurements.json files (any run, tracking=none included) or
MLflow runs (see pipeline.report.mlflow_runs). Either way a run is its measurements.json record
plus what the source knows about it (its name, its pruner choice, its sweep)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.sweeps.outcomes import pruner_choice

# What every measurements.json since the paired comparison holds; older files are refused.
REQUIRED_KEYS = ("baseline", "pruned", "reduction_pct", "accuracy_change", "latency_ratio")


class ReportError(PipelineError):
    """Bad report input; the message is one line naming the option and what is allowed."""


@dataclass
class RunRecord:
    record: dict  # the run's measurements.json
    source: str  # a path, or "MLflow run <id>"
    name: str | None = None  # the MLflow run name
    pruner: str | None = None  # the pruner config-group choice (mean_rank, apoz), where known
    run_id: str | None = None
    parent_run_id: str | None = None  # the sweep's parent MLflow run


def check_record(record: object, where: str) -> dict:
    if not isinstance(record, dict) or any(key not in record for key in REQUIRED_KEYS):
        raise ReportError(
            f"{where} is not a pipeline measurements.json (it needs the keys "
            f"{', '.join(REQUIRED_KEYS)}); give the measurements.json of finished runs"
        )
    return record


def from_paths(paths: list[str]) -> tuple[list[RunRecord], list[str]]:
    """Runs from measurements.json files, or from folders searched for them (a sweep folder, a
    runs folder); also returns notes on job folders that hold none (failed or unfinished)."""
    runs: list[RunRecord] = []
    notes: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ReportError(
                f"{given}: no such file or folder; give measurements.json files or "
                "folders that hold them"
            )
        if path.is_file():
            files = [path]
        else:
            files = sorted(path.rglob("measurements.json"), key=_job_order)
            if not files:
                raise ReportError(
                    f"{given}: no measurements.json under this folder; give a run "
                    "or sweep folder of finished runs"
                )
            for hydra_dir in sorted(path.rglob(".hydra")):
                job = hydra_dir.parent
                if not (job / "measurements.json").exists():
                    notes.append(f"{job}: no measurements.json (the job failed or is running)")
        for file in files:
            try:
                record = json.loads(file.read_text())
            except (OSError, ValueError) as error:
                raise ReportError(f"{file}: not readable as JSON ({error})") from None
            runs.append(
                RunRecord(
                    check_record(record, str(file)), str(file), None, pruner_choice(file.parent)
                )
            )
    return runs, notes


def _job_order(path: Path) -> tuple:
    """Sweep jobs in their number order (2 before 10), other folders by name."""
    return tuple(int(part) if part.isdigit() else -1 for part in path.parts), str(path)
