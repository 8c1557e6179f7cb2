"""Every bad input of tests/rejected_inputs.py, typed as a user would: exit code 2, one line on
the console naming the key, no traceback, no cache entry, and a FAILED MLflow run wherever the
store can be reached."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from conftest import ROOT, run_cli
from rejected_inputs import PAYLOAD_MARKER, ROWS

# A command line per row, each importing MLflow to write its FAILED run: about 2 minutes.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def output_root(tmp_path_factory):
    """One store for all rows: each adds its own FAILED run to it."""
    return tmp_path_factory.mktemp("rejected")


def failed_runs(output_root) -> list:
    database = output_root / "mlflow.db"
    if not database.exists():
        return []
    client = MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("pruning")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [run for run in runs if run.info.status == "FAILED"]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_fails_fast_with_one_line(row, output_root, tmp_path):
    before = len(failed_runs(output_root))
    result = run_cli(*row.overrides(tmp_path), f"paths.output_root={output_root}", cwd=ROOT)

    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {row.key}"), lines[0]
    assert not (output_root / "cache").exists(), "a rejected run must not train or cache anything"
    assert not (tmp_path / PAYLOAD_MARKER).exists(), "a checkpoint's pickled code ran"
    if row.id != "tracking-server-unreachable":  # no store to write a FAILED run into
        runs = failed_runs(output_root)
        assert len(runs) == before + 1
        newest = max(runs, key=lambda run: run.info.start_time)
        assert lines[0].removeprefix("error: ") in newest.data.tags["error"]
