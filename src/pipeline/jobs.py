"""What each job of a sweep leaves for the sweep to read back: its outcome (finished, failed,
skipped), and, before it runs, whether the same job already finished (resume).

Outcomes are files in the job's folder, not process state, so that the main process learns them
whatever launcher ran the job (in-process, joblib workers, submitit, Ray).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import plain
from pipeline.files import write_json
from pipeline.schema import RunSettings

OUTCOME_FILE = "outcome.json"
RECORD_FILE = "measurements.json"
# Settings that change where or how a run is recorded, not what it measures.
NOT_IDENTITY = ("force", "tracking", "paths", "num_workers", "search")


def config_identity(settings: RunSettings) -> str:
    """A hash of the resolved settings that decide a run's results: equal hash, same job."""
    tree = {k: v for k, v in plain(settings).items() if k not in NOT_IDENTITY}
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_outcome(job_dir: Path, status: str, **details: object) -> None:
    """`status`: finished | failed | skipped, with what the summary needs to say about it."""
    write_json({"status": status, **details}, job_dir / OUTCOME_FILE)


@dataclass
class Finished:
    """An earlier run of the same job: its record, and where it was found."""

    record: dict
    where: str  # an MLflow run id or a measurements.json path


def finished_before(settings: RunSettings, identity: str) -> Finished | None:
    """The latest FINISHED run with this identity: in the tracking store when tracking is on,
    else among the measurements.json files under paths.output_root."""
    if settings.tracking.enabled:
        from pipeline.tracking import finished_run_record

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
        if record.get("config_identity") == identity:
            return Finished(record, str(path))
    return None


# The outcomes of the last sweep this process ran, set by the end-of-sweep callback.
last_sweep: list[JobOutcome] = []


@dataclass
class JobOutcome:
    number: str  # the job's folder name under the sweep folder
    status: str  # finished | failed | skipped | did not finish
    overrides: list[str]
    record: dict | None
    error: str | None
    pruner: str | None = None  # the pruner group's choice (apoz, mean_rank)

    @property
    def failed(self) -> bool:
        """Failed, or ended without an outcome (killed, out of memory)."""
        return self.status in ("failed", "did not finish")


def sweep_outcomes(sweep_dir: Path) -> list[JobOutcome]:
    """Every job folder of a sweep with its outcome; a job that left none was killed or never
    ended ("did not finish")."""
    outcomes = []
    job_dirs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    for job_dir in sorted(job_dirs, key=lambda p: int(p.name)):
        overrides, pruner = _hydra_record(job_dir)
        try:
            outcome = json.loads((job_dir / OUTCOME_FILE).read_text())
        except (OSError, ValueError):
            outcomes.append(JobOutcome(job_dir.name, "did not finish", overrides, None, None))
            continue
        record = None
        if (job_dir / RECORD_FILE).is_file():
            record = json.loads((job_dir / RECORD_FILE).read_text())
        status, error = outcome["status"], outcome.get("error")
        outcomes.append(JobOutcome(job_dir.name, status, overrides, record, error, pruner))
    return outcomes


def _hydra_record(job_dir: Path) -> tuple[list[str], str | None]:
    """The job's overrides and pruner choice, as Hydra wrote them into its .hydra folder."""
    from omegaconf import OmegaConf

    path = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(path) if path.is_file() else []
    return [str(o) for o in overrides], pruner_choice(job_dir)


def pruner_choice(run_dir: Path) -> str | None:
    """The run's pruner group choice (apoz, mean_rank), from the Hydra record in its folder."""
    hydra_file = Path(run_dir) / ".hydra" / "hydra.yaml"
    if not hydra_file.exists():
        return None
    try:
        from omegaconf import OmegaConf

        choices = OmegaConf.load(hydra_file).hydra.runtime.choices
        return str(choices.get("pruner")) if choices.get("pruner") else None
    except Exception:  # a hand-edited or partial file: callers fall back to the class name
        return None


def swept(outcome: JobOutcome, outcomes: list[JobOutcome] | None = None) -> str:
    """The overrides that tell this job from the other jobs of its sweep (those all jobs share,
    the tiny settings or the output folder, say nothing about it)."""
    outcomes = last_sweep if outcomes is None else outcomes
    shared = set.intersection(*(set(o.overrides) for o in outcomes)) if len(outcomes) > 1 else set()
    return " ".join(o for o in outcome.overrides if o not in shared) or "-"
