"""Sweeps that survive: a re-run skips the jobs that already finished (force=true runs them),
every sweep ends with a summary table and a Pareto plot, presets run as sweeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import ROOT, TINY, run_cli
from pipeline.checks.settings import settings_from
from pipeline.checks.sweep_plan import job_overrides
from pipeline.config.compose import compose
from pipeline.config.identity import config_identity, identity_settings
from pipeline.files import write_json
from pipeline.report.sweep_table import summary_rows, write_summary
from pipeline.sweeps.outcomes import JobOutcome
from pipeline.sweeps.resume import finished_before

# Job 0 is quick, job 1 fine-tunes long enough to be killed in the middle.
SWEEP = [
    "-m",
    "finetune.epochs=1,15",
    *[arg for arg in TINY if not arg.startswith("finetune.epochs")],
    "pruner.iterations=1",
]


def wait_for(pattern: str, root: Path, process: subprocess.Popen, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(root.glob(pattern))
        if found:
            return found[0]
        assert process.poll() is None, f"the sweep ended (exit {process.returncode}) first"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern} under {root} within {timeout} s")


def sweep_parents(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("pruning")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [run for run in runs if run.data.tags.get("sweep") == "true"]


@pytest.mark.slow
def test_a_rerun_sweep_runs_only_what_did_not_finish_and_force_runs_all(tmp_path):
    output_root = tmp_path / "outputs"
    args = [*SWEEP, f"paths.output_root={output_root}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for("sweeps/*/*/0/outcome.json", output_root, process, timeout=300)
        wait_for("sweeps/*/*/1/.hydra/overrides.yaml", output_root, process, timeout=120)
        process.send_signal(signal.SIGKILL)  # the sweep dies in job 1
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    again = run_cli(*args, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.splitlines()
    skipped = [line for line in lines if line.startswith("skipped:")]
    assert len(skipped) == 1 and "finetune.epochs=1 " in skipped[0], skipped
    # Before the skip line: what the earlier run found, and where its MLflow run is.
    at = lines.index(skipped[0])
    assert lines[at - 1].startswith("MLflow: mlflow ui --backend-store-uri sqlite:///")
    assert "?workflowType=machine_learning (this run: http://127.0.0.1:5000/#/" in lines[at - 1]
    assert "; model models:/m-" in lines[at - 1]  # and its MLflow model
    assert any(line.startswith(" accuracy (top-1)") for line in lines[:at])
    sweep_dir = sorted(output_root.glob("sweeps/*/*"))[-1]
    summary = (sweep_dir / "summary.md").read_text()
    assert "| 0 | finetune.epochs=1 |" in summary and "| skipped |" in summary
    assert "| 1 | finetune.epochs=15 |" in summary and "| finished |" in summary
    assert (sweep_dir / "summary_pareto.png").stat().st_size > 10_000
    assert "sweep summary" in again.stdout

    client = MlflowClient(f"sqlite:///{output_root / 'mlflow.db'}")
    first, second = sweep_parents(client)
    assert client.get_run(first.info.run_id).info.status == "KILLED"  # its process is gone
    artifacts = {a.path for a in client.list_artifacts(second.info.run_id)}
    assert {"summary.md", "summary_pareto.png"} <= artifacts, artifacts
    assert second.data.tags["sweep.skipped_jobs"] == "1"

    forced = run_cli(*args, "force=true", cwd=ROOT)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert not [line for line in forced.stdout.splitlines() if line.startswith("skipped:")]
    third = sweep_parents(client)[-1]
    children = client.search_runs(
        [third.info.experiment_id], f"tags.mlflow.parentRunId = '{third.info.run_id}'"
    )
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]


def test_identity_ignores_where_a_run_is_recorded_but_not_what_it_measures():
    base = settings_from(compose([]))
    same = settings_from(compose(["force=true", "tracking=none", "paths.output_root=elsewhere"]))
    other = settings_from(compose(["sparsity=0.3"]))
    assert config_identity(base) == config_identity(same) != config_identity(other)


def test_an_option_left_at_its_neutral_value_keeps_earlier_runs_and_baselines_valid():
    """A run made before finetune.max_grad_norm existed is the same job as one that leaves it
    at null: resume still finds it and the cached baseline is still used; setting the option
    makes another job, and setting baseline.max_grad_norm another baseline."""
    from pipeline.models.baseline_cache import baseline_cache_path

    base = settings_from(compose([]))
    neutral = settings_from(compose(["finetune.max_grad_norm=null"]))
    clipped = settings_from(compose(["finetune.max_grad_norm=1.0"]))
    assert "max_grad_norm" not in identity_settings(base)["finetune"]
    assert config_identity(base) == config_identity(neutral) != config_identity(clipped)
    assert baseline_cache_path(base) == baseline_cache_path(clipped)
    trained_clipped = settings_from(compose(["baseline.max_grad_norm=1.0"]))
    assert baseline_cache_path(base) != baseline_cache_path(trained_clipped)
    # measure.precision came later; fp32 is what every earlier run measured in.
    assert "precision" not in identity_settings(base)["measure"]
    half = settings_from(compose(["measure.precision=bf16"]))
    assert config_identity(half) != config_identity(base)
    assert baseline_cache_path(half) == baseline_cache_path(base)


def test_without_tracking_finished_runs_are_found_in_the_output_folder(tmp_path):
    settings = settings_from(compose(["tracking=none", f"paths.output_root={tmp_path}"]))
    identity = config_identity(settings)
    assert finished_before(settings, identity) is None
    for folder, record_identity in [("runs/a", "another"), ("sweeps/b/1", identity)]:
        (tmp_path / folder / ".hydra").mkdir(parents=True)
        write_json({"config_identity": record_identity}, tmp_path / folder / "measurements.json")
    # MLflow's copy of a run's files (no .hydra/ beside it) is not a run folder.
    copy = tmp_path / "mlartifacts" / "1" / "abc" / "artifacts" / "measurements.json"
    write_json({"config_identity": identity}, copy)
    os.utime(copy, (time.time() + 60, time.time() + 60))  # newest: found first if it counted
    found = finished_before(settings, identity)
    assert found is not None and found.where.endswith("b/1/measurements.json")


def test_a_skipped_run_shows_what_it_found_or_says_why_it_cannot():
    from pipeline.cli import earlier_summary
    from pipeline.sweeps.resume import Finished

    address = "run abc: mlflow ui --backend-store-uri sqlite:///x.db, then #/experiments/1/runs/abc"
    shown = earlier_summary(Finished(fake_record(0.1, 0.94, 6e6), "abc", address))
    assert shown.startswith("(its summary cannot be shown: KeyError: ")  # an older record
    assert shown.endswith(f"\nMLflow: {address}")


def fake_record(sparsity: float, accuracy: float, macs: float) -> dict:
    side = lambda acc, m: {  # noqa: E731
        "accuracy": acc,
        "params": m / 2,
        "macs": m,
        "size_bytes": 4 * m,
        "latency_ms": {"p50": m / 1e6},
    }
    return {
        "baseline": side(0.95, 8e6),
        "pruned": side(accuracy, macs),
        "accuracy_change": {
            "points": 100 * (accuracy - 0.95),
            "ci_low": -1.0,
            "ci_high": 1.0,
            "significant": False,
        },
        "latency_ratio": {"ratio": macs / 8e6, "ci_low": 0.5, "ci_high": 1.0, "noisy": False},
        "config": {"sparsity": sparsity, "pruner": {"_target_": "x.ActivationAPoZRankPruner"}},
        "finetune_history": [{}, {}],
    }


def test_summary_marks_the_pareto_rows_and_lists_every_job(tmp_path):
    outcomes = [
        JobOutcome("0", "finished", ["sparsity=0.1"], fake_record(0.1, 0.94, 6e6), None, "apoz"),
        JobOutcome("1", "finished", ["sparsity=0.2"], fake_record(0.2, 0.90, 7e6), None, "apoz"),
        JobOutcome("2", "skipped", ["sparsity=0.3"], fake_record(0.3, 0.91, 4e6), None, "apoz"),
        JobOutcome("3", "failed", ["sparsity=0.9"], None, "CUDA out of memory", "apoz"),
        JobOutcome("4", "did not finish", ["sparsity=0.5"], None, None, "apoz"),
    ]
    rows = summary_rows(outcomes)
    assert rows[0][1] == "baseline"
    pareto = {row[0]: row[-1] for row in rows[1:]}
    # Job 1 costs more than job 0 and is less accurate: dominated. Jobs 0 and 2 trade off.
    assert pareto == {"0": "yes", "1": "", "2": "yes", "3": "", "4": ""}
    status = {row[0]: row[-2] for row in rows[1:]}
    assert status["3"] == "failed: CUDA out of memory" and status["4"] == "did not finish"
    summary, plot, text = write_summary(tmp_path, outcomes)
    assert summary.read_text().count("\n| ") == 7  # header + baseline + 5 jobs
    assert plot is not None and plot.stat().st_size > 10_000


def test_summary_has_a_latency_column_for_each_further_batch_size(tmp_path):
    timed = fake_record(0.2, 0.93, 5e6)
    timed["latency_by_batch"] = [
        timed["latency_ratio"] | {"batch_size": 1},
        {"batch_size": 64, "ratio": 0.61, "ci_low": 0.6, "ci_high": 0.62, "noisy": True},
    ]
    outcomes = [
        JobOutcome("0", "finished", ["sparsity=0.2"], timed, None, "apoz"),
        JobOutcome("1", "finished", ["sparsity=0.1"], fake_record(0.1, 0.94, 6e6), None, "apoz"),
        JobOutcome("2", "failed", ["sparsity=0.9"], None, "CUDA out of memory", "apoz"),
    ]
    _, _, text = write_summary(tmp_path, outcomes)
    rows = table_of(text)
    assert [row["latency ratio, batch 64"] for row in rows] == [
        "1",
        "0.610 [0.600, 0.620] noisy",
        "",
        "",
    ]
    assert rows[3]["status"] == "failed: CUDA out of memory"  # the columns stay aligned


def table_of(markdown: str) -> list[dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    cells = lambda line: [cell.strip() for cell in line.strip("|").split(" | ")]  # noqa: E731
    return [dict(zip(cells(lines[0]), cells(line), strict=True)) for line in lines[1:]]


def test_presets_run_as_sweeps_and_their_jobs_are_checked_first():
    cfg = compose(["sweep=reference"], with_hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    jobs = job_overrides(["sweep=reference"])
    values = {arg for overrides in jobs for arg in overrides}
    assert {"pruner=apoz", "pruner=mean_rank", "sparsity=0.05", "sparsity=0.15"} <= values
    jobs = job_overrides(["sweep=sparsity_grid", "sparsity=0.3"])  # the command line wins
    assert jobs == [["sweep=sparsity_grid", "sparsity=0.3"]]
