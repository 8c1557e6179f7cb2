"""The command line as a user types it."""

import json

import pytest

from conftest import ROOT, TINY, run_cli


@pytest.mark.slow
def test_reference_command_completes_and_prints_the_summary(tmp_path):
    result = run_cli(
        "pruner=mean_rank", "sparsity=0.15", *TINY, f"paths.output_root={tmp_path}", cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy (top-1)" in result.stdout
    (measurements,) = (tmp_path / "runs").glob("*/*/measurements.json")
    record = json.loads(measurements.read_text())
    assert record["config"]["sparsity"] == 0.15
    # The last line says where to see the run: MLflow's runs view, and the run's page.
    last = result.stdout.strip().splitlines()[-1]
    store = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert last.startswith(f"MLflow: mlflow ui --backend-store-uri {store}, then http://")
    assert "?workflowType=machine_learning (this run: http://127.0.0.1:5000/#/experiments/" in last
    assert "; model models:/m-" in last  # the pruned network, logged as an MLflow model


def test_bad_value_exits_non_zero_with_one_line(tmp_path):
    result = run_cli("pruner.mode=greedy", f"paths.output_root={tmp_path}", cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        "error: pruner.mode='greedy' is not allowed; allowed values: normal, dependency_aware"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_unknown_pruner_exits_non_zero_with_one_line(tmp_path):
    result = run_cli("pruner=magnitude", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: pruner='magnitude' is not allowed; allowed values: apoz, fpgm, l1_norm, l2_norm, "
        "mean_rank, taylor, tp_activation, tp_lamp, tp_magnitude, tp_taylor"
    )
