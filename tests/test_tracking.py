"""MLflow tracking: sweeps with parent and child runs, failures, the server and the UI."""

from __future__ import annotations

import json
import os
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
REGISTERED = "pruned-mobilenet"


def store_uri(output_root: Path) -> str:
    return f"sqlite:///{output_root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory) -> Path:
    """One tiny two-job sweep on the default store, shared by the tests that read it; its best
    job's model is registered as pruned-mobilenet@champion. Its output is kept in stdout.txt."""
    output_root = tmp_path_factory.mktemp("sweep")
    result = run_cli(
        "-m",
        "sparsity=0.05,0.15",
        *TINY,
        f"paths.output_root={output_root}",
        f"tracking.register_as={REGISTERED}",
        "tracking.register=best",
        "measure.onnx=true",  # an ONNX model beside each pyfunc one
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (output_root / "stdout.txt").write_text(result.stdout)
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
        "latency_ratio_b1",  # one set per batch size timed: batch 1 on the CPU by default
        "latency_ratio_b1_ci_low",
        "pruned.latency_p50_ms_b1",
        "baseline.latency_p50_ms_b1",
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


@pytest.mark.slow
def test_a_sweep_registers_its_best_job_and_its_parent_names_it(sweep_store):
    client = MlflowClient(store_uri(sweep_store))
    (version,) = client.search_model_versions(f"name='{REGISTERED}'")
    assert client.get_model_version_by_alias(REGISTERED, "champion").version == version.version
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    children = client.search_runs([experiment], "tags.mlflow.parentRunId != ''")
    # The best by the sweep's objective (test accuracy); a tie goes to the first job.
    order = sorted(children, key=lambda run: float(run.data.params["sparsity"]))
    best = max(order, key=lambda run: run.data.metrics["pruned.accuracy"])
    assert version.run_id == best.info.run_id
    model_id = version.source.removeprefix("models:/")
    assert client.get_logged_model(model_id).source_run_id == best.info.run_id
    (parent,) = client.search_runs([experiment], "tags.sweep = 'true'")
    assert parent.data.tags["best.run_id"] == best.info.run_id
    assert parent.data.metrics["best.accuracy"] == best.data.metrics["pruned.accuracy"]
    assert parent.data.metrics["best.macs_ratio"] == pytest.approx(best.data.metrics["macs_ratio"])
    assert parent.data.metrics["best.latency_ratio"] == best.data.metrics["latency_ratio"]
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["digits"]
    printed = (sweep_store / "stdout.txt").read_text()
    assert f"registered: models:/{REGISTERED}@champion is version 1 (job " in printed


@pytest.mark.slow
def test_the_champion_served_over_http_answers_like_the_loaded_model(sweep_store, monkeypatch):
    """`mlflow models serve` as the README shows it: 4 images in, the in-process scores out."""
    import numpy as np

    from pipeline import load_logged_model
    from pipeline.data.datasets import digits

    uri = store_uri(sweep_store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    splits = digits(10, 32, 0.1, 0.2, seed=1234)
    images = np.stack([splits.test[i][0].numpy() for i in range(4)]).astype(np.float32)
    expected = load_logged_model(f"models:/{REGISTERED}@champion").predict(images)
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "models", "serve",
            "-m", f"models:/{REGISTERED}@champion", "--env-manager", "local",
            "--host", "127.0.0.1", "-p", str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": {"images": images.tolist()}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            scores = np.asarray(json.load(answer)["predictions"], dtype=np.float32)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert scores.shape == (4, 10)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer") from None
            time.sleep(0.5)


@pytest.mark.slow
@needs_chromium
def test_the_printed_address_opens_runs_with_datasets_and_models_with_metrics(
    sweep_store, mlflow_server, tmp_path
):
    """Screenshots of what a user lands on (kept in $PIPELINE_SCREENSHOTS when set)."""
    from selenium.webdriver.common.by import By

    folder = Path(os.environ.get("PIPELINE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    printed = (sweep_store / "stdout.txt").read_text().splitlines()
    (line,) = [text for text in printed if text.startswith("MLflow: mlflow ui")][-1:]
    view = line.split(", then ", 1)[1].split(" ", 1)[0]
    assert view.endswith("?workflowType=machine_learning")
    view = view.replace("http://127.0.0.1:5000", mlflow_server)
    experiment = view.split("#/experiments/", 1)[1].split("?", 1)[0]
    with headless_browser(1900, 1000) as browser:
        browser.get(view)
        wait_for(lambda: "sweep " in browser.page_source, "the sweep's parent run")
        for button in browser.find_elements(
            By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"
        ):
            button.click()
        wait_for(lambda: "mean_rank sparsity=0.15" in browser.page_source, "the jobs")
        # The Dataset column: the parent's row and each job's name the data.
        wait_for(lambda: browser.page_source.count('title="digits (') >= 3, "the Dataset column")
        close_assistant(browser)
        browser.save_screenshot(str(folder / "runs_view.png"))

        browser.get(
            f"{mlflow_server}/#/experiments/{experiment}/models?workflowType=machine_learning"
        )
        for text in ("pruned_onnx", "pruned.accuracy", "macs_ratio", REGISTERED):
            wait_for(lambda text=text: text in browser.page_source, f"{text} in the Models tab")
        close_assistant(browser)
        browser.save_screenshot(str(folder / "models_tab.png"))
    assert (folder / "runs_view.png").stat().st_size > 20_000


def close_assistant(browser) -> None:
    """MLflow 3.17 opens its chat panel beside the table: closed, as a user would."""
    import contextlib

    from selenium.webdriver.common.by import By

    for button in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        with contextlib.suppress(Exception):
            button.click()
    time.sleep(1)


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
