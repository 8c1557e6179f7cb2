"""What a run was trained and tested on, as an MLflow dataset input: the runs table's Dataset
column then names it (name and digest), and the run's page shows its source and split sizes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.data.datasets import DataSplits


def dataset_record(dataset: dict[str, Any], splits: DataSplits) -> dict[str, Any]:
    """Name, digest, source and profile (split sizes) of the run's data. The digest follows the
    dataset's settings and what they produced, so runs on the same data share it."""
    target = str(dataset.get("_target_", "dataset"))
    profile = {
        "train": len(splits.train),
        "val": len(splits.val),
        "test": len(splits.test),
        "num_classes": splits.num_classes,
        "input_shape": list(splits.input_shape),
    }
    if splits.bad_files is not None and splits.bad_files.count:
        profile["bad_files_skipped"] = splits.bad_files.count
    digest = hashlib.sha256(
        json.dumps([dataset, profile], sort_keys=True, default=str).encode()
    ).hexdigest()[:8]
    root = dataset.get("root")
    if root:
        source_type, source = "local", {"uri": str(root)}
    else:
        source_type, source = "code", {"tags": {"builder": target}}
    return {
        "name": target.rsplit(".", 1)[-1],
        "digest": digest,
        "source_type": source_type,
        "source": source,
        "profile": profile,
    }


def dataset_input(record: dict[str, Any]):
    """The MLflow entity for MlflowClient.log_inputs."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=record["name"],
        digest=record["digest"],
        source_type=record["source_type"],
        source=json.dumps(record["source"]),
        profile=json.dumps(record["profile"]),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train/val/test")])
