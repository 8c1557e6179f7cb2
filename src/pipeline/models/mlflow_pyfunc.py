"""The loader MLflow calls for a pruned model logged as a `python_function` model
(pipeline.tracking.logged_model): its MLmodel names this module, not a pickled Python object, and
its data is the folder save_pruned wrote (architecture JSON + safetensors), read by load_pruned.

    mlflow.pyfunc.load_model("models:/<model id>")                       a pipeline.models builder
    mlflow.pyfunc.load_model(uri, model_config={"trusted": ["my_models."]})   a builder of your own

Input: float32 images shaped (N, C, H, W), preprocessed as the run's data were (the MLmodel's
signature gives C, H, W); output: the N x classes logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import WeightsUnavailableError
from pipeline.models.pruned import load_pruned

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class PrunedPredictor:
    """What mlflow.pyfunc wraps: predict() on a batch of images, in eval mode, on the CPU."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        if isinstance(model_input, Mapping):  # a named tensor input: {"images": array}
            model_input = model_input[INPUT_NAME]
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.model(batch).float().numpy()


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> PrunedPredictor:
    """MLflow's entry point. `model_config={"trusted": [...]}`: module prefixes of builders of
    your own that may run, as load_pruned's `trusted`; without it, only pipeline.models'."""
    trusted = list((model_config or {}).get("trusted") or [])
    try:
        model = load_pruned(Path(data_path), "cpu", trusted)
    except WeightsUnavailableError as error:
        if "trusted=" in str(error):  # say how to pass the trust through MLflow
            raise WeightsUnavailableError(
                f"{error} (through MLflow: mlflow.pyfunc.load_model(uri, "
                f"model_config={{'trusted': [...]}}))"
            ) from None
        raise
    return PrunedPredictor(model)
