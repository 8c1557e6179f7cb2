"""What each job of a sweep leaves for the sweep to read back: its outcome (finished, failed,
skipped) and its measurements, as files in the job's folder, not process state, so that the
sweep learns them whatever launcher ran the job (in-process, joblib workers, submitit, Ray).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.files import write_json

OUTCOME_FILE = "outcome.json"

RECORD_FILE = "measurements.json"


def write_job_outcome(job_dir: Path, status: str, **details: object) -> None:
    """`status`: finished | failed | skipped, with what the summary needs to say about it."""
    write_json({"status": status, **details}, job_dir / OUTCOME_FILE)


@dataclass
class JobOutcome:
    number: str  # the job's folder name under the sweep folder
    status: str  # finished | failed | skipped | did not finish
    overrides: list[str]
    record: dict | None
    error: str | None
    pruner: str | None = None  # the pruner group's choice (apoz, mean_rank)
    run_id: str | None = None  # its MLflow run (a skipped job's: the earlier run's)

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
        run_id = outcome.get("run_id")
        if status == "skipped" and record is not None:
            run_id = _run_id(outcome.get("earlier"))
        outcomes.append(JobOutcome(job_dir.name, status, overrides, record, error, pruner, run_id))
    return outcomes


def _run_id(where: str | None) -> str | None:
    """An earlier run's MLflow id, when that is what the resume lookup found (not a path)."""
    if where and len(where) == 32 and all(c in "0123456789abcdef" for c in where):
        return where
    return None


def _hydra_record(job_dir: Path) -> tuple[list[str], str | None]:
    """The job's overrides and pruner choice, as Hydra wrote them into its .hydra folder."""
    path = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(path) if path.is_file() else []
    return [str(o) for o in overrides], pruner_choice(job_dir)


def pruner_choice(run_dir: Path) -> str | None:
    """The run's pruner group choice (apoz, mean_rank), from the Hydra record in its folder."""
    hydra_file = Path(run_dir) / ".hydra" / "hydra.yaml"
    if not hydra_file.exists():
        return None
    try:
        choices = OmegaConf.load(hydra_file).hydra.runtime.choices
        return str(choices.get("pruner")) if choices.get("pruner") else None
    except Exception:  # a hand-edited or partial file: callers fall back to the class name
        return None


def swept(outcome: JobOutcome, outcomes: list[JobOutcome]) -> str:
    """The overrides that tell this job from the other jobs of its sweep (those all jobs share,
    the tiny settings or the output folder, say nothing about it)."""
    shared = set.intersection(*(set(o.overrides) for o in outcomes)) if len(outcomes) > 1 else set()
    return " ".join(o for o in outcome.overrides if o not in shared) or "-"
