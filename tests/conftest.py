"""Shared fixtures: a composed config shrunk to a few batches, one output folder per test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# A few batches of small images, one epoch each, short timing loops: seconds, not minutes.
TINY = [
    "max_batches=2",
    "baseline.epochs=1",
    "baseline.batch_size=16",
    "finetune.epochs=1",
    "finetune.batch_size=16",
    "pruner.training_steps=2",
    "pruner.iterations=2",  # the default 4 steps cost 4 speedups; 2 still go through the loop
    "measure.warmup=1",
    "measure.repeats=3",
    "measure.throughput_batch_size=4",
    "measure.throughput_repeats=1",
]


def make_config(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.output_root = str(tmp_path / "outputs")
        cfg.paths.cache_dir = str(tmp_path / "outputs" / "cache")
    return cfg


@pytest.fixture(autouse=True)
def no_leaked_tracking_uri():
    """mlflow.set_tracking_uri() also sets $MLFLOW_TRACKING_URI; keep it from reaching the next
    test (and the CLI runs it starts), which would then log into another test's store."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def tiny_config(tmp_path):
    return lambda *overrides: make_config(tmp_path, *overrides)


def prune_digits_model(pruner_settings, sparsity: float, seed: int = 0):
    """Prune a freshly initialised digits MobileNetV2 with the project's prune stage.

    The result's model has the original layer shapes with the pruned channels masked."""
    import torch

    from pipeline.data import digits
    from pipeline.models import mobilenet_v2
    from pipeline.stages.prune import prune

    splits = digits(10, 32, 0.1, 0.2, seed=seed)
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=16)
    return prune(
        mobilenet_v2(num_classes=10),
        pruner_settings,
        sparsity,
        loader,
        torch.nn.CrossEntropyLoss(),
        torch.device("cpu"),
        splits.input_shape,
    )


DIGITS_SHAPE = (3, 32, 32)


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m pipeline` as a user would, in `cwd`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
