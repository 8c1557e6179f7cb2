"""The command line under stress: a run stopped by SIGTERM, a sweep in which one job fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from conftest import ROOT, TINY, run_cli

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
    assert named == [f"error: model.weights={missing}: no such checkpoint file"], named
    assert "Traceback" not in result.stderr

    runs = runs_in(output_root)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    by_weights = {child.data.params["model.weights"]: child for child in children}
    assert by_weights["none"].info.status == "FINISHED"
    failed = by_weights[str(missing)]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"].startswith("WeightsUnavailableError: model.weights=")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["sweep.failed_jobs"] == "1"
    assert parent.data.tags["sweep.jobs"] == "2"

    (sweep_dir,) = output_root.glob("sweeps/*/*")
    assert (sweep_dir / "0" / "measurements.json").is_file()
    assert not (sweep_dir / "1" / "measurements.json").exists()
