"""Shared fixtures: a composed config shrunk to a few batches, one output folder per test."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from pipeline.checks.settings import settings_from
from pipeline.config.compose import compose
from pipeline.config.schema import RunSettings
from pipeline.data.datasets import Loaders, StageInputs, digits, make_loaders

ROOT = Path(__file__).resolve().parents[1]

# A few batches of small images, one epoch each, short timing loops: seconds, not minutes.
TINY = [
    "max_batches=2",
    "baseline.epochs=1",
    "baseline.batch_size=16",
    "finetune.epochs=1",
    "finetune.batch_size=16",
    "pruner.batch_size=16",
    "pruner.iterations=2",  # the default 4 steps cost 4 speedups; 2 still go through the loop
    "pruner.recalibration_batches=2",
    "measure.warmup=1",
    "measure.repeats=3",
    "measure.throughput_batch_size=4",
    "measure.throughput_repeats=1",
]


def make_config(tmp_path: Path, *overrides: str) -> DictConfig:
    cfg = compose([*TINY, *overrides])
    # Two ranking batches, for the pruners that rank on data (the others refuse the option).
    if cfg.pruner.get("training_steps") is not None and not any(
        o.startswith("pruner.training_steps=") for o in overrides
    ):
        cfg.pruner.training_steps = 2
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
    """The composed (untyped) config, as the command line and the tracker see it."""
    return lambda *overrides: make_config(tmp_path, *overrides)


@pytest.fixture
def tiny(tmp_path):
    """The typed settings a run takes."""
    return lambda *overrides: settings_from(make_config(tmp_path, *overrides))


DIGITS_SHAPE = (3, 32, 32)


def digits_inputs(batch_size: int = 16, seed: int = 0, max_batches: int | None = None):
    """Stage inputs on the digits data, on the CPU."""
    splits = digits(10, 32, 0.1, 0.2, seed=seed)
    loaders: Loaders = make_loaders(splits, batch_size, seed, max_batches=max_batches)
    return StageInputs(loaders, torch.nn.CrossEntropyLoss(), torch.device("cpu"), DIGITS_SHAPE)


def prune_digits_model(settings: RunSettings, sparsity: float, seed: int = 0, model=None):
    """Prune a freshly initialised digits MobileNetV2 with the project's prune stage (one step).

    The result's model has the original layer shapes with the pruned channels masked."""
    from pipeline.models.zoo import mobilenet_v2
    from pipeline.stages.prune import prune

    inputs = digits_inputs(seed=seed)
    torch.manual_seed(seed)
    model = model if model is not None else mobilenet_v2(num_classes=10)
    return prune(model, inputs, settings.pruner, sparsity)


def run_cli(*args: str, cwd: Path, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    """Run `python -m pipeline` as a user would, in `cwd`; `env` adds to the environment."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **popen.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_chromium = pytest.mark.skipif(
    chromium() is None or shutil.which("chromedriver") is None,
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
)


@contextlib.contextmanager
def headless_browser(width: int, height: int):
    """Debian's headless Chromium through Selenium, quit at the end of the block."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-quic",
    ):  # fmt: skip
        options.add_argument(flag)
    # Debian's driver, named explicitly so that Selenium never tries to download one.
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.set_window_size(width, height)
        yield browser
    finally:
        browser.quit()
