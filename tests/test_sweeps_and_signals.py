"""The command line under stress: a run stopped by SIGTERM or killed by SIGKILL, a sweep in which
one job fails, parallel jobs on one SQLite store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import ROOT, TINY, run_cli

# Whole pipelines and sweeps in subprocesses, killed or run in parallel: minutes in all.
pytestmark = pytest.mark.slow

EXPERIMENT = "pruning"
# Keeps a completing job cheap: an empty NNI config list masks nothing (no speedup to do) and
# no fine-tuning epoch runs; what these tests look at is how runs end, not what they prune.
NO_PRUNING = ["pruner.config_list=[]", "pruner.iterations=1", "finetune.epochs=0"]


def runs_in(output_root: Path) -> list:
    """Every MLflow run of the store a run with paths.output_root=output_root writes to."""
    client = MlflowClient(f"sqlite:///{output_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no {EXPERIMENT!r} experiment under {output_root}"
    return client.search_runs([experiment.experiment_id])


def wait_for_log_line(output_root: Path, text: str, process: subprocess.Popen, timeout: float):
    """Wait until a run's log (outputs/runs/<date>/<time>/*.log) holds `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log_file in output_root.glob("runs/*/*/*.log"):
            if text in log_file.read_text(errors="replace"):
                return
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {text!r}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in a run log within {timeout} s")


def test_sigterm_ends_the_run_killed(tmp_path):
    output_root = tmp_path / "outputs"
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                *TINY,
                "baseline.epochs=500",  # far longer than the test waits
                f"paths.output_root={output_root}",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=err,
        )
        try:
            wait_for_log_line(output_root, "stage baseline: start", process, timeout=120)
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert returncode != 0
    (run,) = runs_in(output_root)
    assert run.info.status == "KILLED", (tmp_path / "stderr").read_text()[-3000:]
    assert run.data.tags["stage.baseline"] == "failed"
    assert run.data.tags["error"].startswith("KeyboardInterrupt")
    assert not list(output_root.rglob("measurements.json"))


def test_a_failing_job_does_not_stop_the_sweep_and_fails_the_parent(tmp_path):
    output_root = tmp_path / "outputs"
    missing = tmp_path / "missing.safetensors"
    result = run_cli(
        "-m",
        f"model.weights=none,{missing}",
        *TINY,
        *NO_PRUNING,
        f"paths.output_root={output_root}",
        cwd=ROOT,
    )

    assert result.returncode == 2, result.stderr[-3000:]
    named = [line for line in result.stderr.splitlines() if "model.weights" in line]
    problem = f"model.weights={missing}: no such checkpoint file"
    assert named == [
        f"warning: a job of this sweep will fail: {problem}",  # said before any job runs
        f"error: {problem}",  # when the job fails
        f"  job 1 (model.weights={missing}): {problem}",  # in the list of failed jobs at the end
    ], named
    assert "Traceback" not in result.stderr

    runs = runs_in(output_root)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    by_weights = {child.data.params["model.weights"]: child for child in children}
    assert by_weights["none"].info.status == "FINISHED"
    failed = by_weights[str(missing)]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == f"ConfigError: {problem}"
    assert parent.info.status == "FAILED"
    assert parent.data.tags["sweep.failed_jobs"] == "1"
    assert parent.data.tags["sweep.jobs"] == "2"

    (sweep_dir,) = output_root.glob("sweeps/*/*")
    summary = (sweep_dir / "summary.md").read_text()
    assert f"| 1 | model.weights={missing} |" in summary and f"| failed: {problem} |" in summary
    assert (sweep_dir / "0" / "measurements.json").is_file()
    assert not (sweep_dir / "1" / "measurements.json").exists()


def test_sigkill_during_finetuning_leaves_nothing_a_rerun_takes_for_complete(tmp_path):
    output_root = tmp_path / "outputs"
    args = [*TINY, "finetune.epochs=30", f"paths.output_root={output_root}"]
    with open(tmp_path / "stderr", "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_for_log_line(output_root, "stage finetune: start", process, timeout=300)
            process.send_signal(signal.SIGKILL)  # no handler runs: nothing gets to clean up
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    (killed_dir,) = output_root.glob("runs/*/*")
    left = {path.name for path in killed_dir.iterdir()}
    assert not left & {"measurements.json", "pruned_model", "config.yaml"}, left
    staging = [p for p in output_root.rglob(".*") if p.name != ".hydra"]
    assert not staging, f"staging files left: {staging}"
    (entry,) = (output_root / "cache" / "baselines").glob("*.safetensors")
    (killed,) = runs_in(output_root)
    assert killed.info.status == "RUNNING"  # until the next run on this host looks

    rerun = run_cli(*args, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    runs = {run.info.run_id: run for run in runs_in(output_root)}
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert runs[killed.info.run_id].data.tags["error"].startswith("process gone")
    (finished,) = [run for run in runs.values() if run.info.run_id != killed.info.run_id]
    assert finished.info.status == "FINISHED"
    (record_path,) = output_root.glob("runs/*/*/measurements.json")
    record = json.loads(record_path.read_text())
    # The baseline entry was complete before the kill (written whole, by rename): reused. The
    # fine-tuning that was cut short left nothing: the rerun fine-tunes all its epochs.
    assert record["baseline_source"] == "cache"
    assert len(record["finetune_history"]) == 30
    assert [p.name for p in (output_root / "cache" / "baselines").glob("*.safetensors")] == [
        entry.name
    ]


def four_job_joblib_sweep(output_root: Path, workers: int, *overrides: str):
    return run_cli(
        "-m",
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={workers}",
        "sparsity=0.1,0.2,0.3,0.4",
        *TINY,
        *overrides,
        f"paths.output_root={output_root}",
        cwd=ROOT,
        timeout=900,
    )


def test_four_parallel_jobs_lose_no_run_or_metric_and_train_one_baseline(tmp_path):
    output_root = tmp_path / "outputs"
    result = four_job_joblib_sweep(output_root, workers=4)
    assert result.returncode == 0, result.stderr[-3000:]

    runs = runs_in(output_root)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 5 and parent.info.status == "FINISHED"
    assert sorted(float(c.data.params["sparsity"]) for c in children) == [0.1, 0.2, 0.3, 0.4]
    client = MlflowClient(f"sqlite:///{output_root / 'mlflow.db'}")
    for child in children:
        assert child.info.status == "FINISHED"
        missing = EXPECTED_METRICS - set(child.data.metrics)
        assert not missing, (child.data.params["sparsity"], sorted(missing))
        steps = client.get_metric_history(child.info.run_id, "finetune.val_accuracy")
        assert len(steps) == 1  # TINY fine-tunes one epoch
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"measurements.json", "config.yaml", "pruned_model"} <= artifacts, artifacts
    records = [
        json.loads(p.read_text()) for p in output_root.glob("sweeps/*/*/*/measurements.json")
    ]
    # The jobs share one baseline: one trains it under the cache lock, the others wait and load.
    assert sorted(r["baseline_source"] for r in records) == ["cache", "cache", "cache", "trained"]


EXPECTED_METRICS = {
    f"{side}.{key}"
    for side in ("baseline", "pruned")
    for key in (
        "accuracy",
        "top5",
        "loss",
        "params",
        "macs",
        "size_bytes",
        "throughput",
        "latency_p50_ms",
        "latency_p90_ms",
    )
} | {
    "accuracy_change_points",
    "accuracy_change_p_value",
    "latency_ratio",
    "latency_ratio_ci_low",
    "latency_ratio_ci_high",
    "reduction.params_pct",
    "prune_step.params",
    "finetune.train_loss",
}


def test_two_joblib_workers_train_the_baseline_once_for_four_jobs(tmp_path):
    output_root = tmp_path / "outputs"
    # What this test looks at is the baseline, not what the jobs prune.
    result = four_job_joblib_sweep(output_root, 2, *NO_PRUNING)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in output_root.glob("sweeps/*/*/*/measurements.*")]
    assert sorted(r["baseline_source"] for r in records) == ["cache", "cache", "cache", "trained"]
    (entry,) = (output_root / "cache" / "baselines").glob("*.safetensors")
    assert all(r["baseline"]["accuracy"] == records[0]["baseline"]["accuracy"] for r in records)
    assert all(child.info.status == "FINISHED" for child in runs_in(output_root))
