"""MLflow tracking: sweeps with parent and child runs, failures, the server and the UI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from conftest import ROOT, TINY, headless_browser, needs_chromium, run_cli
from pipeline.checks.settings import settings_from
from pipeline.tracking.mlflow_tracker import tracked_run

EXPERIMENT = "pruning"


def store_uri(output_root: Path) -> str:
    return f"sqlite:///{output_root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory) -> Path:
    """One tiny two-job sweep on the default store, shared by the tests that read it."""
    output_root = tmp_path_factory.mktemp("sweep")
    result = run_cli(
        "-m", "sparsity=0.05,0.15", *TINY, f"paths.output_root={output_root}", cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_root


@pytest.mark.slow
def test_sweep_gives_a_parent_and_finished_children(sweep_store):
    mlflow.set_tracking_uri(store_uri(sweep_store))
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT])
    parents = runs[runs["tags.sweep"] == "true"]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and len(children) == 2
    parent = parents.iloc[0]
    assert parent["status"] == "FINISHED"
    assert "sparsity=0.05,0.15" in parent["params.sweep.overrides"]
    assert set(children["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    assert set(children["status"]) == {"FINISHED"}
    assert sorted(children["params.sparsity"]) == ["0.05", "0.15"]
    assert set(children["tags.choice.pruner"]) == {"mean_rank"}
    assert set(children["params.pruner._target_"]) == {
        "nni.compression.pytorch.pruning.ActivationMeanRankPruner"
    }
    # Params hold resolved values, not interpolations.
    assert set(children["params.model.num_classes"]) == {"10"}
    for metric in (
        "pruned.accuracy",
        "pruned.params",
        "pruned.latency_p50_ms",
        "accuracy_change_ci_low",
        "accuracy_change_ci_high",
        "latency_ratio",
        "latency_ratio_ci_low",
        "latency_ratio_ci_high",
    ):
        assert children[f"metrics.{metric}"].notna().all(), metric
    # A sparser model has fewer parameters.
    by_sparsity = children.set_index("params.sparsity")["metrics.pruned.params"]
    assert by_sparsity["0.15"] < by_sparsity["0.05"]

    client = MlflowClient(store_uri(sweep_store))
    for run_id in children["run_id"]:
        for series in ("resource.process_cpu_percent", "system/cpu_utilization_percentage"):
            points = client.get_metric_history(run_id, series)
            assert len(points) > 1, f"{series} has {len(points)} point(s)"
        curve = client.get_metric_history(run_id, "finetune.val_accuracy")
        assert [p.step for p in curve] == [1]
        steps = client.get_metric_history(run_id, "prune_step.params")
        assert [p.step for p in steps] == [1, 2]  # pruner.iterations=2 in the tiny config
        assert steps[0].value > steps[1].value
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "measurements.json", "pruned_model", "pipeline.log"} <= artifacts
        assert {"training_curves.png", "resource_usage.png"} <= artifacts
        tags = client.get_run(run_id).data.tags
        assert tags["stage.measure"] == "finished"
        assert tags["baseline.converged"] == "false"  # one epoch in the tiny config
        assert tags["torch_version"] and tags["nni_version"] == "2.10.1" and tags["host"]


def test_a_stage_that_raises_leaves_a_failed_run_with_the_error(tiny_config, tmp_path, monkeypatch):
    import pipeline.run as pipeline_run
    from pipeline.pruning.nni.engine import NniEngine

    def broken_speedup(*args, **kwargs):
        raise RuntimeError("speedup exploded")

    monkeypatch.setattr(NniEngine, "narrow", broken_speedup)
    cfg = tiny_config()
    with pytest.raises(RuntimeError), tracked_run(cfg, "broken") as tracker:
        pipeline_run.run(settings_from(cfg), tmp_path / "run", tracker)

    run = only_run(Path(cfg.paths.output_root))
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: speedup exploded"
    assert run.data.tags["stage.prune"] == "finished"
    assert run.data.tags["stage.speedup"] == "failed"
    assert not (tmp_path / "run" / "measurements.json").exists()


def test_interrupt_ends_the_run_killed(tiny_config):
    cfg = tiny_config()
    with pytest.raises(KeyboardInterrupt), tracked_run(cfg, "interrupted"):
        raise KeyboardInterrupt
    assert only_run(Path(cfg.paths.output_root)).info.status == "KILLED"


def test_tracking_none_writes_no_store(tiny_config, tmp_path):
    cfg = tiny_config("tracking=none")
    with tracked_run(cfg) as tracker:
        tracker.log_metrics({"anything": 1.0})
    assert not (Path(cfg.paths.output_root) / "mlflow.db").exists()


def only_run(output_root: Path):
    client = MlflowClient(store_uri(output_root))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(sweep_store):
    """`mlflow server` on loopback over the sweep's store; stopped after the tests."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            store_uri(sweep_store),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def api(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


@pytest.mark.slow
def test_server_rest_api_lists_the_sweep(mlflow_server):
    experiment = api(mlflow_server, "experiments/search", {"max_results": 10})["experiments"]
    (pruning,) = [e for e in experiment if e["name"] == EXPERIMENT]
    runs = api(mlflow_server, "runs/search", {"experiment_ids": [pruning["experiment_id"]]})["runs"]
    assert len(runs) == 3
    statuses = sorted(run["info"]["status"] for run in runs)
    assert statuses == ["FINISHED"] * 3
    names = {run["info"]["run_name"] for run in runs}
    assert {"mean_rank sparsity=0.05", "mean_rank sparsity=0.15"} <= names


@pytest.mark.slow
@needs_chromium
def test_experiment_page_lists_the_runs_in_a_browser(mlflow_server):
    from selenium.webdriver.common.by import By

    experiments = api(mlflow_server, "experiments/search", {"max_results": 10})["experiments"]
    (pruning,) = [e for e in experiments if e["name"] == EXPERIMENT]
    with headless_browser(1600, 1000) as browser:
        browser.get(f"{mlflow_server}/#/experiments/{pruning['experiment_id']}/runs")
        wait_for(lambda: "sweep " in browser.page_source, "the sweep's parent run")
        # Child runs sit folded under their parent: unfold it as a user would.
        for button in browser.find_elements(
            By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"
        ):
            button.click()
        for name in ("mean_rank sparsity=0.05", "mean_rank sparsity=0.15"):
            wait_for(lambda name=name: name in browser.page_source, name)


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the MLflow UI did not show {what} within {timeout:.0f} s")
        time.sleep(0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_logs_gpu_utilisation_and_memory_series(tiny_config, tmp_path):
    import pipeline.run as pipeline_run

    cfg = tiny_config("device=cuda", "pruner.pruning_on_cuda=true")
    with tracked_run(cfg, "gpu") as tracker:
        record = pipeline_run.run(settings_from(cfg), tmp_path / "run", tracker)
    assert record["device"] == "cuda" and record["pruning"]["device"] == "cuda"
    run = only_run(Path(cfg.paths.output_root))
    client = MlflowClient(store_uri(Path(cfg.paths.output_root)))
    for series in (
        "system/gpu_0_utilization_percentage",
        "system/gpu_0_memory_usage_megabytes",
        "resource.torch_cuda_allocated_mb",
    ):
        assert len(client.get_metric_history(run.info.run_id, series)) > 1, series
    assert run.data.metrics["stage.finetune.torch_cuda_peak_mb"] > 0
    assert run.data.metrics["stage.finetune.peak_gpu_memory_mb"] > 0


def test_logged_params_hold_choices_as_typed_not_enum_names():
    from pipeline.config.compose import compose
    from pipeline.tracking.mlflow_tracker import _resolved_or_raw, flatten

    params = flatten(_resolved_or_raw(compose(["device=cpu", "pruner.mode=normal"])))
    assert (params["device"], params["pruner.mode"]) == ("cpu", "normal")
    assert params["measure.runtime"] == "eager"


def test_the_closing_line_opens_the_runs_view_and_the_run():
    from pipeline.tracking.mlflow_tracker import ui_line

    assert ui_line("http://host:5000/", "3", "abc") == (
        "MLflow: http://host:5000/#/experiments/3?workflowType=machine_learning "
        "(this run: http://host:5000/#/experiments/3/runs/abc)"
    )
    assert ui_line("sqlite:////o/mlflow.db", "1") == (
        "MLflow: mlflow ui --backend-store-uri sqlite:////o/mlflow.db, then "
        "http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"
    )


def test_the_run_records_its_data_as_an_mlflow_dataset_input(tiny_config):
    from pipeline.data.datasets import digits
    from pipeline.tracking.dataset_input import dataset_record

    cfg = tiny_config()
    splits = digits(10, 32, 0.1, 0.2, seed=cfg.seed)
    record = dataset_record(dict(cfg.dataset), splits)
    with tracked_run(cfg, "data") as tracker:
        tracker.log_dataset(record)
        run_id = tracker.run_id
    client = MlflowClient(store_uri(Path(cfg.paths.output_root).resolve()))
    (logged,) = client.get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.name == "digits" and logged.dataset.digest == record["digest"]
    assert json.loads(logged.dataset.profile) == {
        "train": 1257, "val": 180, "test": 360, "num_classes": 10, "input_shape": [3, 32, 32],
    }  # fmt: skip
    assert json.loads(logged.dataset.source) == {"tags": {"builder": "pipeline.data.digits"}}
    assert [t.value for t in logged.tags] == ["train/val/test"]
    other = dataset_record(dict(tiny_config("seed=7").dataset), splits)
    assert other["digest"] != record["digest"]  # another split seed is other data
