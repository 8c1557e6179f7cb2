"""The pruned (and, on request, the baseline) network as an MLflow 3 LoggedModel: a pyfunc model
without a pickle, an ONNX model beside it when the run exported one, their metrics linked, and
registration under a name.

A model is first written in the run folder (`mlflow_models/<name>`, an ordinary MLflow model
directory), then sent as one operation, so that a run whose tracking server stopped answering
keeps it in its outbox like everything else (pipeline.tracking.outbox).

The pyfunc model's MLmodel names pipeline.models.mlflow_pyfunc as its loader, with the
save_pruned folder as its data: loading reads JSON and safetensors, never a pickle. The
pipeline package's own code travels in the model's `code/` folder (the project is not on PyPI,
where a package of the same name is someone else's), and requirements.txt pins the third-party
versions that ran.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import WeightsUnavailableError
from pipeline.files import atomic_path
from pipeline.models.pruned import ARCHITECTURE_FILE, WEIGHTS_FILE

LOADER_MODULE = "pipeline.models.mlflow_pyfunc"
MODELS_FOLDER = "mlflow_models"
CHAMPION = "champion"  # the alias a sweep with tracking.register=best moves to its best job
# What loading needs (not NNI, not Torch-Pruning), pinned to the versions that ran.
REQUIREMENTS = ("torch", "torchvision", "safetensors", "numpy", "filelock")


@dataclass
class ModelToLog:
    """One network to log: its save_pruned folder, what its signature and input example come
    from, and the metrics that describe it."""

    name: str  # "pruned" | "baseline": the LoggedModel's name
    pruned_dir: Path
    input_example: Any  # a float32 array (1, C, H, W) from the test data
    num_classes: int
    metrics: dict[str, float]
    trusted: list[str] = field(default_factory=list)
    onnx_path: Path | None = None
    register_as: str | None = None


def signature(input_shape: tuple[int, ...], num_classes: int):
    """(N, C, H, W) float32 images in, (N, classes) float32 logits out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipeline.models.mlflow_pyfunc import INPUT_NAME, OUTPUT_NAME

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), OUTPUT_NAME)]),
    )


def requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def _package_copy(folder: Path) -> Path:
    """This package's source, without caches and configs, for the model's code/ folder."""
    source = Path(__file__).resolve().parents[1]  # pipeline/, from pipeline/tracking/
    target = folder / "pipeline"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "conf"))
    return target


def save_models(model: ModelToLog, run_dir: Path) -> list[tuple[str, Path]]:
    """Write the MLflow model directories of `model` under run_dir/mlflow_models: the pyfunc
    model, and the ONNX one when there is an ONNX file. Returns (LoggedModel name, folder)."""
    import mlflow.pyfunc

    sig = signature(tuple(model.input_example.shape[1:]), model.num_classes)
    metadata = {
        "pipeline": {
            "version": importlib.metadata.version("pipeline"),
            "loader": LOADER_MODULE,
            # Builders beyond pipeline.models' that this model's architecture calls: loading
            # requires them again, as model_config={"trusted": [...]}.
            "trusted": list(model.trusted),
        }
    }
    saved = []
    target = Path(run_dir) / MODELS_FOLDER / model.name
    with tempfile.TemporaryDirectory() as work, atomic_path(target, directory=True) as staging:
        shutil.rmtree(staging)  # save_model wants to create it
        data = Path(work) / "pruned_model"  # what load_pruned reads, and nothing else
        data.mkdir()
        for name in (ARCHITECTURE_FILE, WEIGHTS_FILE):
            shutil.copy2(Path(model.pruned_dir) / name, data / name)
        mlflow.pyfunc.save_model(
            str(staging),
            loader_module=LOADER_MODULE,
            data_path=str(data),
            code_paths=[str(_package_copy(Path(work) / "code"))],
            signature=sig,
            input_example=model.input_example,
            pip_requirements=requirements(),
            metadata=metadata,
        )
    saved.append((model.name, target))
    if model.onnx_path is not None and Path(model.onnx_path).exists():
        import mlflow.onnx
        import onnx

        onnx_target = Path(run_dir) / MODELS_FOLDER / f"{model.name}_onnx"
        with atomic_path(onnx_target, directory=True) as staging:
            shutil.rmtree(staging)
            mlflow.onnx.save_model(
                onnx.load(str(model.onnx_path)),
                str(staging),
                signature=sig,
                input_example=model.input_example,
                pip_requirements=[*requirements()[:1], *_onnx_requirements()],
                metadata=metadata,
            )
        saved.append((f"{model.name}_onnx", onnx_target))
    return saved


def _onnx_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in ("onnx", "onnxruntime")]


def send_model(client, run_id: str, op: dict[str, Any]) -> str:
    """Create the LoggedModel of a saved model folder (or find the one an interrupted send
    created), link its metrics, upload it, mark it READY, register it when asked. Returns its
    model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    run = client.get_run(run_id)
    experiment = run.info.experiment_id
    name = op["name"]
    found = client.search_logged_models(
        [experiment], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"
    )
    model = found[0] if found else None
    if model is None:
        model = client.create_logged_model(
            experiment,
            name=name,
            source_run_id=run_id,
            params=op.get("params") or None,
            model_type=op.get("model_type"),
            tags={"pipeline.loader": op.get("loader", "")},
        )
    model_id = model.model_id
    if model.status != LoggedModelStatus.READY:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
        dataset = op.get("dataset") or {}
        stamp = int(op.get("time", time.time()) * 1000)
        metrics = [
            Metric(
                key,
                float(value),
                stamp,
                0,
                model_id=model_id,
                dataset_name=dataset.get("name"),
                dataset_digest=dataset.get("digest"),
            )
            for key, value in op.get("metrics", {}).items()
        ]
        if metrics:
            client.log_batch(run_id, metrics=metrics)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "model"
            shutil.copytree(op["path"], local)
            _stamp_mlmodel(local / "MLmodel", model, run_id)
            client.log_model_artifacts(model_id, str(local))
        client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    if op.get("register_as"):
        register(client, op["register_as"], model_id, run_id)
    return model_id


def _stamp_mlmodel(path: Path, model, run_id: str) -> None:
    """The ids MLflow's own log_model writes into MLmodel (the UI and `models:/` read them)."""
    data = yaml.safe_load(path.read_text())
    data |= {
        "model_id": model.model_id,
        "model_uuid": model.model_id,
        "run_id": run_id,
        "artifact_path": model.artifact_location,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def register(client, name: str, model_id: str, run_id: str, alias: str | None = None):
    """A new version of registered model `name` from the LoggedModel; `alias` moved to it."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
    )
    # The LoggedModel lists its versions in this tag (as mlflow.register_model writes it, which
    # works only on the global tracking URI): the Models tab's "Registered models" column.
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    listed.append({"name": name, "version": version.version})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def run_model_id(client, run_id: str, name: str = "pruned") -> str | None:
    """The id of the LoggedModel `name` that run `run_id` produced, if any."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"
    )
    return found[0].model_id if found else None


def load_logged_model(uri: str, trusted: list[str] | tuple[str, ...] = ()):
    """mlflow.pyfunc.load_model for a model the pipeline logged, after checking that it is one:
    its MLmodel (YAML, read safely) must name the pipeline's loader, so that a model whose
    MLmodel was swapped for a pickled Python model is refused before MLflow would unpickle it.
    `trusted`: builders of your own the architecture may call (see load_pruned)."""
    import mlflow.pyfunc
    from mlflow.artifacts import download_artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = Path(download_artifacts(artifact_uri=uri))
        flavors = yaml.safe_load((local / "MLmodel").read_text()).get("flavors", {})
    except Exception as error:
        raise WeightsUnavailableError(
            f"{uri}: not an MLflow model that can be read ({type(error).__name__}); allowed "
            "values: a models:/ or runs:/ URI, or a folder, of a model the pipeline logged"
        ) from None
    pyfunc = flavors.get("python_function", {})
    if pyfunc.get("loader_module") != LOADER_MODULE or set(pyfunc) & {
        "python_model",
        "cloudpickle_version",
    }:
        loader = pyfunc.get("loader_module") or pyfunc.get("python_model") or "none"
        raise WeightsUnavailableError(
            f"{uri}: refused, its MLmodel loads through {loader!r}, not the pipeline's loader; "
            f"allowed values: a model logged by the pipeline (loader_module {LOADER_MODULE})"
        )
    return mlflow.pyfunc.load_model(str(local), model_config={"trusted": list(trusted)})
