"""Sweep jobs run by other launchers than Hydra's basic one: submitit's local executor
(subprocesses), a Ray instance the launcher starts, and a running Ray instance it joins. Each
job must end a FINISHED MLflow run, a child of the sweep's parent run, and write its
measurements.json. (hydra/launcher=joblib: tests/test_sweeps_and_signals.py.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import ROOT, TINY, run_cli

pytestmark = pytest.mark.slow

RAY_MISSING = not all(
    importlib.util.find_spec(name) for name in ("ray", "hydra_plugins.hydra_ray_launcher")
)
needs_ray = pytest.mark.skipif(
    RAY_MISSING, reason="ray is not installed (the `ray` extra): pip install -e '.[ray]'"
)


def two_job_sweep(output_root: Path, *launcher: str):
    return run_cli(
        "-m",
        *launcher,
        "sparsity=0.2,0.4",
        *TINY,
        f"paths.output_root={output_root}",
        cwd=ROOT,
        timeout=900,
    )


def assert_finished_children_with_measurements(result, output_root: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{output_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pruning")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    jobs = [r for r in runs if r is not parent]
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert len(jobs) == 2, statuses
    assert set(statuses.values()) == {"FINISHED"}, statuses
    # The parent's id reached each worker (PIPELINE_MLFLOW_PARENT_RUN_ID): no orphan runs.
    assert [r.data.tags.get("mlflow.parentRunId") for r in jobs] == [parent.info.run_id] * 2
    # The jobs ran in worker processes, not in the process that launched the sweep.
    pids = {r.data.tags["process.pid"] for r in jobs}
    assert parent.data.tags["process.pid"] not in pids
    assert sorted(float(r.data.params["sparsity"]) for r in jobs) == [0.2, 0.4]
    (sweep_dir,) = output_root.glob("sweeps/*/*")
    for job in ("0", "1"):
        assert (sweep_dir / job / "measurements.json").is_file(), sorted(sweep_dir.iterdir())


def test_submitit_local_runs_each_job_in_its_own_process(tmp_path):
    output_root = tmp_path / "outputs"
    result = two_job_sweep(output_root, "hydra/launcher=submitit_local")
    assert_finished_children_with_measurements(result, output_root)


@pytest.fixture
def no_ray_usage_report(monkeypatch):
    """Ray reports usage statistics over the network unless told not to."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")


@needs_ray
def test_ray_launcher_starts_a_local_ray_instance(tmp_path, no_ray_usage_report):
    output_root = tmp_path / "outputs"
    result = two_job_sweep(
        output_root,
        "hydra/launcher=ray",
        "+hydra.launcher.ray.init.num_cpus=2",
        "+hydra.launcher.ray.init.include_dashboard=false",
    )
    assert_finished_children_with_measurements(result, output_root)


@pytest.fixture
def ray_instance(no_ray_usage_report):
    """A Ray instance started here, as `ray start` would: its workers are children of this
    process, so they do not inherit the sweep's environment."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=78_643_200)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


@needs_ray
def test_ray_cluster_launcher_carries_the_parent_run_to_workers(tmp_path, ray_instance):
    output_root = tmp_path / "outputs"
    result = two_job_sweep(
        output_root, "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={ray_instance}"
    )
    assert_finished_children_with_measurements(result, output_root)
