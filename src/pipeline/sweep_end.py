"""The end of a sweep (a Hydra callback): one MLflow parent run per multirun with the jobs as its
children, the sweep's summary table and comparison report, and the command's exit status."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.report.sweep_report import sweep_report
from pipeline.report.sweep_table import write_summary
from pipeline.sweeps.objectives import best_job
from pipeline.sweeps.outcomes import JobOutcome, sweep_outcomes, swept
from pipeline.tracking.environment import environment_tags, process_tags
from pipeline.tracking.mlflow_tracker import (
    MAX_PARAM_LENGTH,
    PARENT_RUN_ENV,
    experiment_id,
    quiet_mlflow,
    ui_line,
)
from pipeline.tracking.store import tracking_uri


def best_line(best: JobOutcome, outcomes: list[JobOutcome], config: DictConfig) -> str:
    """One line naming the best job by the sweep's objective, with its key figures."""
    record = best.record
    search = (config.get("search") or {}).get("objective", "accuracy")
    search = getattr(search, "value", search)
    macs = (
        record["pruned"]["macs"] / record["baseline"]["macs"] if record["baseline"]["macs"] else 0
    )
    line = (
        f"best job by search.objective={search}: job {best.number} ({swept(best, outcomes)}): "
        f"accuracy {record['pruned']['accuracy']:.4f}, MACs ratio {macs:.3f}, "
        f"latency ratio {record['latency_ratio']['ratio']:.3f}"
        + (f", run {best.run_id}" if best.run_id else "")
    )
    if search == "accuracy":
        line += runner_up_note(best, outcomes)
    return line


def runner_up_note(best: JobOutcome, outcomes: list[JobOutcome]) -> str:
    """How far the next most accurate job is, and whether the test set can tell them apart:
    a gap inside the 95 % binomial half-width of the best job's accuracy is a tie."""
    import math

    others = [
        o for o in outcomes if o is not best and not o.failed and o.record and o.record["pruned"]
    ]
    if not others:
        return ""
    runner = max(others, key=lambda o: o.record["pruned"]["accuracy"])
    accuracy = best.record["pruned"]["accuracy"]
    gap = 100 * (accuracy - runner.record["pruned"]["accuracy"])
    n = best.record["pruned"].get("test_samples") or 0
    if not n:
        return f"; next: job {runner.number}, {gap:.2f} pts lower"
    half = 100 * 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1 / n) / n)
    verdict = "within" if gap <= half else "beyond"
    return (
        f"; next: job {runner.number}, {gap:.2f} pts lower, {verdict} the test set's noise "
        f"(+-{half:.2f} pts over {n} images)"
    )


def register_best(client, name: str, best: JobOutcome) -> str:
    """Register the best job's pruned model under `name` and move `champion` to it; the line
    that says what was done, or why not."""
    from pipeline.errors import one_line
    from pipeline.tracking.logged_model import CHAMPION, register, run_model_id

    model_id = run_model_id(client, best.run_id) if best.run_id else None
    if model_id is None:
        return (
            f"tracking.register=best: job {best.number} has no logged model to register "
            f"(tracking.log_model=false, or its model still waits in its run's outbox)"
        )
    try:
        version = register(client, name, model_id, best.run_id, alias=CHAMPION)
    except Exception as error:
        return f"tracking.register=best: registering {name!r} failed: {one_line(error)}"
    return (
        f"registered: models:/{name}@{CHAMPION} is version {version.version} "
        f"(job {best.number}, model models:/{model_id})"
    )


class SweepParentRun(Callback):
    """Hydra callback: one MLflow parent run per multirun, each job's run its child; at the end,
    the sweep's summary table and comparison report from the files its jobs left, and exit
    status 2 when a job failed."""

    def __init__(self) -> None:
        self._outcomes: list[JobOutcome] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = config.get("tracking") or {}
        if not tracking.get("enabled", False):
            return
        from mlflow import MlflowClient

        quiet_mlflow()
        uri = tracking_uri(tracking.get("uri"), config.paths.output_root)
        client = MlflowClient(uri)
        exp_id = experiment_id(client, tracking["experiment"], config.paths.output_root)
        overrides = list(config.hydra.overrides.task)
        run = client.create_run(
            exp_id,
            run_name=f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags=environment_tags()
            | process_tags()
            | {"sweep": "true", "sweep.dir": str(config.hydra.sweep.dir)},
        )
        client.log_param(run.info.run_id, "sweep.overrides", " ".join(overrides)[:MAX_PARAM_LENGTH])
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        self._client = client
        self._ui_line = ui_line(uri, exp_id, run.info.run_id)
        # A job error aborts Hydra's sweep before on_multirun_end: never leave the parent RUNNING.
        atexit.register(self._close)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # The summary table and the comparison report of the jobs, from the files they left
        # (tracking=none too); the parent run, still open, gets copies.
        sweep_dir = Path(str(config.hydra.sweep.dir))
        self._outcomes = sweep_outcomes(sweep_dir) if sweep_dir.is_dir() else []
        summary = pareto = None
        if self._outcomes:
            summary, pareto, table = write_summary(sweep_dir, self._outcomes)
            print(f"\nsweep summary ({summary}):\n{table}")
        report = sweep_report(sweep_dir)
        run_id = os.environ.get(PARENT_RUN_ENV)
        best = best_job(self._outcomes)
        if best is not None:
            print(best_line(best, self._outcomes, config))
        if run_id is not None and hasattr(self, "_client"):
            with contextlib.suppress(Exception):  # a lost copy must not fail a finished sweep
                self._datasets_of_jobs(run_id)
            if best is not None:
                self._mark_best(run_id, best, config)
        if run_id is not None and hasattr(self, "_client"):
            with contextlib.suppress(Exception):  # a lost copy must not fail a finished sweep
                for path in (summary, pareto):
                    if path is not None:
                        self._client.log_artifact(run_id, str(path))
                if report is not None:
                    self._client.log_artifacts(run_id, str(report), "report")
        self._close()
        if getattr(self, "_ui_line", None):  # the runs view, and the sweep's parent run
            print(self._ui_line)
        failed = [o for o in self._outcomes if o.failed]
        if failed:
            print(f"{len(failed)} of {len(self._outcomes)} jobs failed:", file=sys.stderr)
            for outcome in failed:
                reason = outcome.error or outcome.status
                print(
                    f"  job {outcome.number} ({swept(outcome, self._outcomes)}): {reason}",
                    file=sys.stderr,
                )
            sys.exit(2)  # Hydra lets SystemExit through: `python -m pipeline -m ...` exits 2

    def _datasets_of_jobs(self, parent_id: str) -> None:
        """The jobs' dataset inputs (one per digest) on the parent, so that its collapsed
        row's Dataset column says what the sweep ran on."""
        experiment = self._client.get_run(parent_id).info.experiment_id
        children = self._client.search_runs(
            [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
        )
        found = {}
        for child in children:
            for item in child.inputs.dataset_inputs if child.inputs else []:
                found.setdefault(item.dataset.digest, item)
        if found:
            self._client.log_inputs(parent_id, datasets=list(found.values()))

    def _mark_best(self, parent_id: str, best: JobOutcome, config: DictConfig) -> None:
        """The parent run carries the best job's key figures and run id (its collapsed row
        answers "which was best"); with tracking.register=best, the best job's model becomes a
        version of tracking.register_as, with the alias `champion`."""
        record = best.record
        metrics = {
            "best.accuracy": record["pruned"]["accuracy"],
            "best.latency_ratio": record["latency_ratio"]["ratio"],
        }
        if record["baseline"]["macs"]:
            metrics["best.macs_ratio"] = record["pruned"]["macs"] / record["baseline"]["macs"]
        with contextlib.suppress(Exception):  # a lost figure must not fail a finished sweep
            for key, value in metrics.items():
                self._client.log_metric(parent_id, key, float(value))
            self._client.set_tag(parent_id, "best.job", best.number)
            if best.run_id:
                self._client.set_tag(parent_id, "best.run_id", best.run_id)
        tracking = config.get("tracking") or {}
        if tracking.get("register") != "best" or not tracking.get("register_as"):
            return
        print(register_best(self._client, tracking["register_as"], best), flush=True)

    def _close(self) -> None:
        run_id = os.environ.pop(PARENT_RUN_ENV, None)
        if run_id is None or not hasattr(self, "_client"):
            return
        children = self._client.search_runs(
            [self._client.get_run(run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        )
        failed = [c for c in children if c.info.status != "FINISHED"]
        outcomes = self._outcomes
        if outcomes:  # the jobs' own outcome files: skipped jobs have no child run
            failed = [o for o in outcomes if o.failed]
            skipped = [o for o in outcomes if o.status == "skipped"]
            self._client.set_tag(run_id, "sweep.skipped_jobs", str(len(skipped)))
        self._client.set_tag(run_id, "sweep.jobs", str(len(outcomes) or len(children)))
        self._client.set_tag(run_id, "sweep.failed_jobs", str(len(failed)))
        # A sweep that ran no job at all (the launcher failed first) did not succeed either.
        ran = bool(outcomes or children)
        self._client.set_terminated(run_id, "FAILED" if failed or not ran else "FINISHED")
