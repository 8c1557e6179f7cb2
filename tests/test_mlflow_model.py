"""The pruned network as an MLflow model: logged with its metrics linked, loaded in a fresh
process that has neither NNI nor Torch-Pruning, as ONNX too, and never unpickled."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from conftest import make_config
from pipeline import load_pruned
from pipeline.checks.settings import settings_from
from pipeline.data.datasets import digits
from pipeline.errors import WeightsUnavailableError
from pipeline.tracking.logged_model import load_logged_model
from pipeline.tracking.mlflow_tracker import tracked_run
from test_safe_loading import Payload

# measure.onnx needs the runtimes extra (onnx to export, onnxruntime to load); README's test
# command installs only .[dev], so the ONNX model is logged and checked only where they are.
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime"))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One tiny tracked run that exports ONNX too: (record, run folder, store URI)."""
    import pipeline.run as pipeline_run

    tmp_path = tmp_path_factory.mktemp("logged")
    onnx = ["measure.onnx=true"] if HAS_ONNX else []
    cfg = make_config(tmp_path, *onnx, "pruner.iterations=1", "tracking.log_baseline_model=true")
    run_dir = tmp_path / "run"
    with tracked_run(cfg, "logged") as tracker:
        record = pipeline_run.run(settings_from(cfg), run_dir, tracker)
    uri = f"sqlite:///{Path(cfg.paths.output_root).resolve() / 'mlflow.db'}"
    return record, run_dir, uri


def first_test_images(count: int = 16) -> np.ndarray:
    """The first test images of the tiny run's data (the same seed and split)."""
    splits = digits(10, 32, 0.1, 0.2, seed=1234)
    return np.stack([splits.test[i][0].numpy() for i in range(count)]).astype(np.float32)


FRESH_PROCESS = """
import sys
sys.modules["nni"] = None            # neither can be imported here
sys.modules["torch_pruning"] = None
import numpy as np
import mlflow.pyfunc
for name in ("nni", "torch_pruning"):
    try:
        __import__(name)
        raise SystemExit(name + " imported")
    except ImportError:
        pass
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
"""


def test_a_fresh_process_without_nni_or_torch_pruning_loads_the_logged_model(logged, tmp_path):
    record, run_dir, uri = logged
    model_id = record["mlflow_models"]["pruned"]["model_id"]
    images = first_test_images()
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, f"models:/{model_id}", "images.npy", "out.npy"],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import torch

    in_process = load_pruned(run_dir / "pruned_model")
    with torch.inference_mode():
        expected = in_process(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-5)


def test_the_logged_model_carries_metrics_signature_pins_and_no_pickle(logged, tmp_path):
    from mlflow.artifacts import download_artifacts

    record, run_dir, uri = logged
    client = MlflowClient(uri)
    models = record["mlflow_models"]
    pruned = client.get_logged_model(models["pruned"]["model_id"])
    assert str(pruned.status).endswith("READY") and pruned.name == "pruned"
    assert pruned.source_run_id == client.search_runs([pruned.experiment_id])[0].info.run_id
    linked = {m.key: m for m in pruned.metrics}
    assert linked["pruned.accuracy"].value == pytest.approx(record["pruned"]["accuracy"])
    assert linked["latency_ratio"].value == pytest.approx(record["latency_ratio"]["ratio"])
    macs_ratio = record["pruned"]["macs"] / record["baseline"]["macs"]
    assert linked["macs_ratio"].value == pytest.approx(macs_ratio)
    assert linked["pruned.accuracy"].dataset_name == "digits"  # the data it was measured on
    assert pruned.params["sparsity"] == "0.15" and pruned.params["pruner.engine"] == "nni"

    local = Path(download_artifacts(f"models:/{pruned.model_id}", dst_path=str(tmp_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "pipeline.models.mlflow_pyfunc"
    assert mlmodel["model_id"] == pruned.model_id
    inputs = json.loads(mlmodel["signature"]["inputs"])
    outputs = json.loads(mlmodel["signature"]["outputs"])
    assert inputs[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 3, 32, 32]}
    assert outputs[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 10]}
    example = json.loads((local / "input_example.json").read_text())
    assert np.asarray(example).shape == (1, 3, 32, 32)
    pins = (local / "requirements.txt").read_text().split()
    assert f"torch=={importlib.metadata.version('torch')}" in pins
    assert {p.split("==")[0] for p in pins} >= {"mlflow", "torchvision", "safetensors"}
    assert not [p for p in pins if p.startswith(("nni", "torch-pruning", "torch_pruning"))]
    # Nothing in the model is a pickle: no .pkl, no file that starts with pickle's opcode.
    for path in local.rglob("*"):
        if path.is_file():
            assert path.suffix != ".pkl" and path.read_bytes()[:1] != b"\x80", path

    # The unpruned network too, on request, with its own figures.
    baseline = client.get_logged_model(models["baseline"]["model_id"])
    linked = {m.key: m.value for m in baseline.metrics}
    assert linked["baseline.accuracy"] == pytest.approx(record["baseline"]["accuracy"])
    assert "pruned.accuracy" not in linked
    # The run's record names its models, for the reports' links.
    assert models["pruned"]["address"].endswith(
        f"/models/{pruned.model_id}?workflowType=machine_learning"
    )


@pytest.mark.skipif(not HAS_ONNX, reason="measure.onnx needs the runtimes extra")
def test_the_onnx_model_beside_it_has_the_same_signature_and_scores(logged, tmp_path):
    import mlflow.pyfunc
    from mlflow.artifacts import download_artifacts

    record = logged[0]
    models = record["mlflow_models"]
    local = Path(
        download_artifacts(f"models:/{models['pruned']['model_id']}", dst_path=str(tmp_path))
    )
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    onnx_id = models["pruned_onnx"]["model_id"]
    onnx_local = Path(download_artifacts(f"models:/{onnx_id}", dst_path=str(tmp_path / "o")))
    assert yaml.safe_load((onnx_local / "MLmodel").read_text())["signature"] == mlmodel["signature"]
    images = first_test_images(4)
    scores = mlflow.pyfunc.load_model(str(onnx_local)).predict({"images": images})["logits"]
    expected = load_logged_model(str(local)).predict(images)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


def test_loading_an_mlflow_model_never_runs_a_pickled_payload(logged, tmp_path):
    import mlflow.pyfunc
    from mlflow.artifacts import download_artifacts

    record, _, _ = logged
    marker = tmp_path / "payload-ran"
    model_id = record["mlflow_models"]["pruned"]["model_id"]
    good = Path(download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "good")))

    # 1. The weights replaced by a pickle: MLflow's own loader (ours inside it) refuses.
    weights = tmp_path / "weights"
    shutil.copytree(good, weights)
    (weights_file,) = weights.glob("data/*/model.safetensors")
    weights_file.write_bytes(pickle.dumps(Payload(marker)))
    for load in (mlflow.pyfunc.load_model, load_logged_model):
        with pytest.raises(WeightsUnavailableError) as caught:
            load(str(weights))
        assert "not a pruned model that load_pruned can read" in str(caught.value)
        assert "\n" not in str(caught.value) and not marker.exists()

    # 2. The MLmodel swapped for a pickled Python model: refused before MLflow would unpickle.
    swapped = tmp_path / "swapped"
    shutil.copytree(good, swapped)
    (swapped / "python_model.pkl").write_bytes(pickle.dumps(Payload(marker)))
    mlmodel = yaml.safe_load((swapped / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    flavor.pop("loader_module")
    flavor |= {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"}
    (swapped / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(WeightsUnavailableError) as caught:
        load_logged_model(str(swapped))
    assert str(caught.value) == (
        f"{swapped}: refused, its MLmodel loads through 'mlflow.pyfunc.model', not the "
        "pipeline's loader; allowed values: a model logged by the pipeline (loader_module "
        "pipeline.models.mlflow_pyfunc)"
    )
    assert not marker.exists()

    # 3. An architecture that names a builder nobody trusted: refused, saying how to trust it.
    untrusted = tmp_path / "untrusted"
    shutil.copytree(good, untrusted)
    (architecture,) = untrusted.glob("data/*/architecture.json")
    spec = json.loads(architecture.read_text())
    spec["model"] = {"_target_": "os.system", "command": f"touch {marker}"}
    architecture.write_text(json.dumps(spec))
    for load in (mlflow.pyfunc.load_model, load_logged_model):
        with pytest.raises(WeightsUnavailableError) as caught:
            load(str(untrusted))
        message = str(caught.value)
        assert "model builder 'os.system' is not one of pipeline.models" in message
        assert "model_config={'trusted': [...]}" in message and "\n" not in message
        assert not marker.exists()
