"""benchmarks/models.py: every torchvision classifier through both engines, with the layers each
pruned, and a best engine only where the measurements tell the engines apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_recipe_benchmark import BENCHMARKS, load


@pytest.fixture
def models(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its siblings
    return load("models")


def row(macs: float, ratio: float, low: float, high: float) -> dict:
    latency = {"ratio": ratio, "ci_low": low, "ci_high": high}
    return {"status": "pass", "macs": 100.0, "pruned_macs": macs, "latency": latency}


def test_the_best_engine_is_named_only_where_the_measurements_tell_them_apart(models):
    pruners = ["mean_rank", "tp_magnitude"]
    fewer_macs = {"mean_rank": row(50.0, 0.6, 0.5, 0.7), "tp_magnitude": row(45.0, 0.7, 0.6, 0.8)}
    assert models.best(fewer_macs, pruners) == "tp_magnitude"
    overlapping = {
        "mean_rank": row(50.0, 0.6, 0.5, 0.7),
        "tp_magnitude": row(50.2, 0.55, 0.4, 0.65),
    }
    assert models.best(overlapping, pruners) == "tie"
    apart = {"mean_rank": row(50.0, 0.6, 0.58, 0.62), "tp_magnitude": row(50.2, 0.5, 0.48, 0.52)}
    assert models.best(apart, pruners) == "tp_magnitude"
    one = {"mean_rank": {"status": "fail"}, "tp_magnitude": row(80.0, 0.9, 0.8, 1.0)}
    assert models.best(one, pruners) == "tp_magnitude"
    assert models.best({"mean_rank": {"status": "fail"}}, pruners) is None


def test_torch_pruning_prunes_only_free_widths_of_the_families_it_cannot_take(models):
    assert models.free_widths("shufflenet_v2_x1_0") == ["*.branch2"]
    assert models.free_widths("resnet18") is None
    assert "pruner.submodules=['*.mlp']" in models.pruner_overrides("tp_magnitude", "swin_t")
    # NNI does not read the option: its run is the whole graph, and fails there.
    assert not any("submodules" in o for o in models.pruner_overrides("mean_rank", "swin_t"))


@pytest.mark.slow
def test_a_table_with_a_model_only_torch_pruning_takes(tmp_path: Path):
    output = tmp_path / "models.md"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "models.py"), "--models",
         "resnet18,shufflenet_v2_x0_5", "--results", str(tmp_path / "results"), "--output",
         str(output)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    text = output.read_text()
    assert "**1 of 2** with `mean_rank` (NNI), **2 of 2** with `tp_magnitude`" in text
    assert "**2 of 2 with at least one engine**" in text
    shufflenet = next(line for line in text.splitlines() if line.startswith("| shufflenet"))
    cells = [cell.strip() for cell in shufflenet.strip("|").split("|")]
    assert cells[2] == "fail: speedup" and cells[8] == "pass"
    assert cells[9].startswith("32 of 56: stage2.*.branch2.*")
    assert cells[-1] == "Torch-Pruning (`tp_magnitude`)"
    assert "NNI 2.10.1's ModelSpeedup cannot take this model" in text
