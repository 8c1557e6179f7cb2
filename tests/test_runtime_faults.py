"""Faults that happen during a run, through the command line as a user meets them (issue 37's
table): each row injects one fault into a real `python -m pipeline` process, then checks the one
line the user sees, the MLflow run's final status and that nothing already complete was lost.
Faults are injected by tests/fault_injection/sitecustomize.py ($PIPELINE_FAULT) or by the data
the row writes; the pipeline's code is the shipped code."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from conftest import ROOT, TINY, run_cli

pytestmark = pytest.mark.slow

INJECTION = Path(__file__).parent / "fault_injection"


def image_tree(root: Path, extra: Callable[[Path], None] | None = None) -> Path:
    """root/<class>/<n>.png, 2 classes x 12 images, plus what `extra` adds."""
    for label, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for n in range(12):
            Image.new("RGB", (32, 32), (20 * n, 200 * label, 60)).save(root / name / f"{n}.png")
    if extra is not None:
        extra(root)
    return root


def truncated_jpeg(root: Path) -> None:
    noise = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    Image.fromarray(noise.to(torch.uint8).numpy()).save(buffer, "JPEG")
    (root / "cats" / "cut.jpg").write_bytes(buffer.getvalue()[:-400])


def gray_and_rgba(root: Path) -> None:
    Image.new("L", (32, 32), 80).save(root / "cats" / "gray.png")
    Image.new("RGBA", (32, 32), (0, 200, 60, 128)).save(root / "dogs" / "rgba.png")


@dataclass(frozen=True)
class Fault:
    id: str
    injected: str  # how the row injects the fault (the note's table says the same)
    overrides: Callable[[Path], list[str]]  # from the row's scratch folder
    line: str | None  # the exact console line (a regex), None for a run that completes
    statuses: list[str]  # the MLflow runs' final statuses, oldest first
    env: dict[str, str] = field(default_factory=dict)
    exit_code: int = 2


def imagefolder(extra, *more: str) -> Callable[[Path], list[str]]:
    return lambda scratch: [
        "dataset=imagefolder",
        f"dataset.root={image_tree(scratch / 'images', extra)}",
        "dataset.image_size=32",
        *more,
    ]


FAULTS = [
    Fault(
        "nan-loss-finetune-epoch-2",
        "the loss turns NaN from fine-tuning epoch 2's first step (a hook on the loss)",
        lambda scratch: ["finetune.epochs=2"],
        r"error: finetune: the training loss became nan at epoch 2, step 1 \(learning rate "
        r"[0-9.e-]+\), so the stage stopped and kept nothing; lower finetune.lr or set "
        r"finetune.max_grad_norm",
        ["FAILED"],
        env={"PIPELINE_FAULT": "nan_loss:finetune 2"},
    ),
    Fault(
        "truncated-jpeg-fail",
        "a JPEG cut 400 bytes short in an imagefolder tree, dataset.bad_files=fail (default)",
        imagefolder(truncated_jpeg),
        r"error: \S+/cats/cut\.jpg cannot be read as an image \(truncated: the JPEG end marker "
        r"is missing\); dataset.bad_files=skip leaves such files out",
        ["FAILED"],
    ),
    Fault(
        "truncated-jpeg-skip",
        "the same tree with dataset.bad_files=skip",
        imagefolder(truncated_jpeg, "dataset.bad_files=skip"),
        None,
        ["FINISHED"],
        exit_code=0,
    ),
    Fault(
        "grayscale-and-rgba-png",
        "a grayscale PNG and an RGBA PNG among the RGB ones",
        imagefolder(gray_and_rgba),
        None,
        ["FINISHED"],
        exit_code=0,
    ),
    Fault(
        "disk-full-saving-pruned-model",
        "writing the pruned model's weights writes half, then raises ENOSPC (a patched write)",
        lambda scratch: [],
        r"error: no space left on the device of \S+/pruned_model: [0-9.]+ MiB free, about "
        r"[0-9.]+ MiB needed; nothing was left half-written \(free some space, or set "
        r"paths.output_root to another disk\)",
        ["FAILED"],
        env={"PIPELINE_FAULT": "enospc:pruned_model"},
    ),
    Fault(
        "out-of-memory-in-a-2-job-sweep",
        "fine-tuning on a batch of more than 32 raises CUDA's OutOfMemoryError (a hook), in a "
        "sweep over finetune.batch_size=16,48",
        lambda scratch: ["-m", "finetune.batch_size=16,48"],
        r"error: finetune ran out of GPU memory at finetune.batch_size=48 \(CUDA out of memory\. "
        r"Tried to allocate 20\.00 GiB \(injected by the test\)\); lower finetune.batch_size",
        ["FINISHED", "FAILED"],
        env={"PIPELINE_FAULT": "oom_above:finetune:32"},
    ),
]


def job_runs(output_root: Path) -> list:
    """The MLflow runs of the jobs, oldest first (a sweep's parent run left out)."""
    client = MlflowClient(f"sqlite:///{output_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pruning")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [run for run in runs if "sweep.jobs" not in run.data.tags]


def job_folders(output_root: Path) -> list[Path]:
    """The run folders of the jobs (not MLflow's artifact copies of their files)."""
    logs = output_root.glob("*/**/pipeline.log")
    return sorted({log.parent for log in logs if "mlartifacts" not in log.parts})


@pytest.mark.parametrize("fault", FAULTS, ids=[fault.id for fault in FAULTS])
def test_a_fault_during_a_run(fault, tmp_path):
    output_root = tmp_path / "outputs"
    overrides = fault.overrides(tmp_path)
    flags = ["-m"] if "-m" in overrides else []  # Hydra takes the flag first
    args = [
        *flags,
        *TINY,
        "pruner.iterations=1",
        "pruner.training_steps=2",
        *(o for o in overrides if o != "-m"),  # after TINY, so that the row's values win
        f"paths.output_root={output_root}",
    ]
    env_path = os.pathsep.join(filter(None, [str(INJECTION), os.environ.get("PYTHONPATH")]))
    result = run_cli(*args, cwd=ROOT, env={"PYTHONPATH": env_path, **fault.env})
    said = result.stdout + result.stderr
    assert result.returncode == fault.exit_code, said[-3000:]
    assert "Traceback" not in said
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    if fault.line is None:
        assert errors == []
    else:
        assert len(errors) == 1 and re.fullmatch(fault.line, errors[0]), errors

    runs = job_runs(output_root)
    assert [run.info.status for run in runs] == fault.statuses
    for run in runs:
        if run.info.status == "FAILED":
            assert run.data.tags["error"].endswith(errors[0].removeprefix("error: "))
    # What was lost: nothing complete. A failed job leaves no measurements.json and no
    # half-written pruned model; a baseline that finished stays cached; a finished job keeps all.
    for folder in job_folders(output_root):
        outcome_file = folder / "outcome.json"  # a sweep's jobs; a single run has its exit code
        if outcome_file.exists():
            outcome = json.loads(outcome_file.read_text())["status"]
        else:
            outcome = "failed" if result.returncode else "finished"
        left = sorted(path.name for path in folder.iterdir())
        assert not any(name.startswith(".pruned_model") for name in left), left
        if outcome == "failed":
            assert "measurements.json" not in left and "pruned_model" not in left, left
        else:
            assert {"measurements.json", "pruned_model"} <= set(left), left
    # Every row but the refused data gets past the baseline, whose cache entry then stays.
    trained = fault.id != "truncated-jpeg-fail"
    assert len(list((output_root / "cache" / "baselines").glob("*.safetensors"))) == trained

    if fault.id == "truncated-jpeg-skip":
        (record,) = [
            json.loads((f / "measurements.json").read_text()) for f in job_folders(output_root)
        ]
        skipped = record["bad_files_skipped"]
        assert skipped["count"] == 1 and skipped["of"] == 25
        assert skipped["first"][0].endswith("cut.jpg: truncated: the JPEG end marker is missing")
        assert runs[0].data.tags["data.bad_files_skipped"] == "1"
    if fault.id == "grayscale-and-rgba-png":
        (record,) = [
            json.loads((f / "measurements.json").read_text()) for f in job_folders(output_root)
        ]
        assert record["bad_files_skipped"] is None
        assert "data.bad_files_skipped" not in runs[0].data.tags
