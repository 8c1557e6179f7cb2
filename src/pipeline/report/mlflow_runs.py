"""The report's side of MLflow: find the runs of an experiment, of a sweep or by id, read their
measurements.json artifacts, and log a finished report to a sweep's parent run. (Runs are
written by pipeline.tracking; this module only reads them, and adds the report.)"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.report.sources import ReportError, RunRecord, check_record

MAX_RUNS = 5000  # one search page; far more than a sweep or an experiment here holds


def client_for(uri: str):
    """An MlflowClient on an existing store: a SQLite path that does not exist is refused,
    where MLflow would quietly create an empty database there."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs or sqlite:///relative
        if not path.exists():
            raise ReportError(
                f"--tracking-uri {uri}: no MLflow store there; give the store the runs were "
                "logged to (default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)"
            )
    return MlflowClient(uri)


def from_mlflow(
    uri: str,
    experiment: str | None = None,
    sweep: str | None = None,
    run_ids: list[str] | None = None,
) -> tuple[list[RunRecord], list[str]]:
    """Finished runs with their measurements.json: every run of `experiment` (sweep parents
    left out), the jobs of the sweep whose parent run is `sweep`, or the runs `run_ids`; also
    returns notes on runs left out."""
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    try:
        if experiment is not None:
            return _experiment_runs(client, uri, experiment)
        if sweep is not None:
            return _sweep_runs(client, uri, sweep)
        return [_record(client, _get_run(client, uri, "--runs", run_id)) for run_id in run_ids], []
    except MlflowException as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ReportError(f"--tracking-uri {uri}: {first}") from None


def _get_run(client, uri: str, option: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ReportError(
            f"{option} {run_id}: no such run in {uri}; give run ids as the MLflow UI shows them"
        ) from None
    if option == "--runs" and run.data.tags.get("sweep") == "true":
        raise ReportError(f"--runs {run_id} is a sweep's parent run; use --sweep {run_id}")
    return run


def _experiment_runs(client, uri: str, name: str) -> tuple[list[RunRecord], list[str]]:
    found = client.get_experiment_by_name(name)
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ReportError(f"--experiment {name}: no such experiment in {uri}; there: {names}")
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        max_results=MAX_RUNS,
        order_by=["attributes.start_time ASC"],
    )
    runs = [run for run in runs if run.data.tags.get("sweep") != "true"]
    records, notes = _readable(client, runs)
    if not records:
        raise ReportError(f"--experiment {name}: no finished run with a measurements.json")
    return records, notes


def _sweep_runs(client, uri: str, parent_id: str) -> tuple[list[RunRecord], list[str]]:
    parent = _get_run(client, uri, "--sweep", parent_id)
    if parent.data.tags.get("sweep") != "true":
        raise ReportError(
            f"--sweep {parent_id}: this run is not a sweep's parent run (tag sweep=true); "
            "give the parent's id, or use --runs for single runs"
        )
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=MAX_RUNS,
        order_by=["attributes.start_time ASC"],
    )
    finished = [run for run in children if run.info.status == "FINISHED"]
    notes = [
        f"run {run.info.run_name} ({run.info.run_id}) ended {run.info.status}: left out"
        for run in children
        if run.info.status != "FINISHED"
    ]
    records, more = _readable(client, finished)
    if not records:
        raise ReportError(f"--sweep {parent_id}: no finished job with a measurements.json")
    return records, notes + more


def _readable(client, runs: list) -> tuple[list[RunRecord], list[str]]:
    records, notes = [], []
    for run in runs:
        try:
            records.append(_record(client, run))
        except ReportError as error:
            notes.append(f"{error}: left out")
    return records, notes


def _record(client, run) -> RunRecord:
    where = f"MLflow run {run.info.run_id}"
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = client.download_artifacts(run.info.run_id, "measurements.json", folder)
        except Exception:  # MLflow raises several kinds for a missing artifact
            raise ReportError(f"{where} has no measurements.json artifact") from None
        record = json.loads(Path(local).read_text())
    tags = run.data.tags
    return RunRecord(
        record=check_record(record, where),
        source=where,
        name=run.info.run_name,
        pruner=tags.get("choice.pruner"),
        run_id=run.info.run_id,
        parent_run_id=tags.get("mlflow.parentRunId"),
    )


def log_report(uri: str, run_id: str, folder: Path, artifact_path: str = "report") -> None:
    """Attach a finished report (report.md, report.html, the PNGs) to a run."""
    client_for(uri).log_artifacts(run_id, str(folder), artifact_path)
