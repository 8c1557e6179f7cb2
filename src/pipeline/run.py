"""One pipeline run, top to bottom: baseline -> prune -> speedup -> finetune -> measure."""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline.cache import cache_key
from pipeline.data import DataSplits, Loaders, make_loaders
from pipeline.export import build_from_config, export_onnx, save_pruned
from pipeline.model_stats import count_params
from pipeline.plots import resource_usage, training_curves
from pipeline.report import summary_table
from pipeline.schema import RunSchema, validate
from pipeline.stages.baseline import baseline
from pipeline.stages.finetune import finetune
from pipeline.stages.iterative import prune_in_steps
from pipeline.stages.measure import measure, quality
from pipeline.stages.prune import save_masks
from pipeline.tracking import Tracker
from pipeline.training import evaluate

log = logging.getLogger(__name__)


def load_settings(cfg: DictConfig) -> RunSchema:
    """Validate the composed config and return it typed; raises ConfigError on bad input."""
    validate(cfg)
    typed = OmegaConf.merge(OmegaConf.structured(RunSchema), _schema_part(cfg))
    return OmegaConf.to_object(typed)


def _schema_part(cfg: DictConfig) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True)
    return {key: value for key, value in plain.items() if key in RunSchema.__dataclass_fields__}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        log.warning("device=cuda requested but no CUDA device is present; using the CPU")
        return torch.device("cpu")
    return torch.device(choice)


def baseline_cache_path(cfg: DictConfig, settings: RunSchema) -> Path | None:
    if not settings.baseline.cache or settings.baseline.checkpoint:
        return None
    training = {
        k: v for k, v in vars(settings.baseline).items() if k not in ("checkpoint", "cache")
    }
    key = cache_key(
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.dataset, resolve=True),
        training,
        OmegaConf.to_container(cfg.finetune.criterion, resolve=True),
        settings.max_batches,
        settings.seed,
    )
    return Path(settings.paths["cache_dir"]) / "baselines" / f"{key}.safetensors"


def write_json(record: dict, path: Path) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=2, default=str)
    os.replace(tmp, path)


def run(cfg: DictConfig, run_dir: Path, tracker: Tracker | None = None) -> dict:
    """All five stages; `tracker` (MLflow or timing only) sees every stage, metric and file."""
    tracker = tracker or Tracker({}, cfg.paths.output_root)
    settings = load_settings(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    device = resolve_device(settings.device)
    on_cuda = settings.pruner.pruning_on_cuda and torch.cuda.is_available()
    prune_device = torch.device("cuda") if on_cuda else torch.device("cpu")
    max_batches = settings.max_batches

    splits: DataSplits = instantiate(cfg.dataset)
    input_shape = splits.input_shape
    baseline_loaders = make_loaders(
        splits, settings.baseline.batch_size, settings.seed, settings.num_workers
    )
    finetune_loaders = make_loaders(
        splits, settings.finetune.batch_size, settings.seed, settings.num_workers
    )
    criterion = instantiate(cfg.finetune.criterion)
    model_config = OmegaConf.to_container(cfg.model, resolve=True)

    with tracker.stage("baseline"):
        base = baseline(
            build_from_config(model_config),
            baseline_loaders,
            criterion,
            instantiate(cfg.baseline.optimizer),
            settings.baseline,
            device,
            baseline_cache_path(cfg, settings),
            max_batches,
        )
        baseline_quality = quality(
            base.model, baseline_loaders.test, criterion, device, input_shape, max_batches
        )

    pruned_model, pruning = prune_stages(
        base.model,
        settings,
        finetune_loaders,
        criterion,
        prune_device,
        input_shape,
        tracker,
        run_dir / "masks.safetensors",
    )

    with tracker.stage("finetune"):
        tuned = finetune(
            pruned_model,
            finetune_loaders,
            criterion,
            instantiate(cfg.finetune.optimizer),
            settings.finetune,
            device,
            max_batches,
            teacher=base.model,
            on_epoch=lambda row: tracker.log_metrics(
                {
                    "finetune.train_loss": row["train_loss"],
                    "finetune.val_accuracy": row["val_accuracy"],
                },
                step=row["epoch"],
            ),
        )

    with tracker.stage("measure"):
        measurements = measure(
            base.model,
            baseline_quality,
            tuned.model,
            finetune_loaders.test,
            criterion,
            device,
            input_shape,
            settings.measure,
            max_batches,
        )

    model_dir = save_pruned(tuned.model, model_config, run_dir / "pruned_model")
    if settings.measure.onnx:
        export_onnx(tuned.model, input_shape, model_dir / "model.onnx")

    record = measurements | {
        "stages": tracker.stage_seconds,
        "resources": tracker.stage_summaries,
        "baseline_source": base.source,
        "baseline_history": base.history,
        "finetune_history": tuned.history,
        "finetune_best_epoch": tuned.best_epoch,
        "pruning": pruning,
        "device": device.type,
        "pruned_model": str(model_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(record, run_dir / "measurements.json")
    log_outcome(tracker, record, run_dir)
    print(summary_table(record))
    return record


def prune_stages(
    model: torch.nn.Module,
    settings: RunSchema,
    loaders: Loaders,
    criterion,
    device: torch.device,
    input_shape: tuple[int, int, int],
    tracker: Tracker,
    masks_path: Path,
) -> tuple[torch.nn.Module, dict]:
    """Stages 2 and 3 (in pruner.iterations steps), each step's size and validation accuracy
    logged; returns the physically smaller model and a summary for measurements.json."""
    steps = []

    def after_step(index: int, current: torch.nn.Module) -> None:
        val = evaluate(current, loaders.val, criterion, device, settings.max_batches, "val")
        row = {"step": index, "params": count_params(current), "val_accuracy": val.accuracy}
        steps.append(row)
        tracker.log_metrics(
            {"prune_step.params": row["params"], "prune_step.val_accuracy": val.accuracy},
            step=index,
        )
        log.info("prune step %d/%d: %s", index, settings.pruner.iterations, row)

    result = prune_in_steps(
        model,
        settings.pruner,
        settings.sparsity,
        loaders.train,
        criterion,
        device,
        input_shape,
        settings.max_batches,
        stage=tracker.stage,
        on_step=after_step,
    )
    save_masks(result.masks_by_step, masks_path)
    summary = {
        "config_list": result.config_list,
        "device": device.type,
        "iterations": settings.pruner.iterations,
        "steps": steps,
    }
    return result.model, summary


def log_outcome(tracker: Tracker, record: dict, run_dir: Path) -> None:
    """Metrics, curves and files of a finished run, for side-by-side comparison in MLflow."""
    metrics = {f"reduction.{key}_pct": value for key, value in record["reduction_pct"].items()}
    metrics["accuracy_drop_points"] = record["accuracy_drop_points"]
    for side in ("baseline", "pruned"):
        report = record[side]
        metrics |= {f"{side}.{key}": report[key] for key in SCALAR_METRICS}
        metrics[f"{side}.latency_p50_ms"] = report["latency_ms"]["p50"]
        metrics[f"{side}.latency_p90_ms"] = report["latency_ms"]["p90"]
    tracker.log_metrics(metrics)
    for row in record["baseline_history"]:
        tracker.log_metrics(
            {
                "baseline_train.train_loss": row["train_loss"],
                "baseline_train.val_accuracy": row["val_accuracy"],
            },
            step=row["epoch"],
        )
    if not tracker.enabled:
        return
    OmegaConf.save(OmegaConf.create(record["config"]), run_dir / "config.yaml")
    curves = training_curves(
        {"baseline": record["baseline_history"], "finetune": record["finetune_history"]},
        run_dir / "training_curves.png",
    )
    usage = resource_usage(tracker.sampler.samples, run_dir / "resource_usage.png")
    for path in (run_dir / "config.yaml", run_dir / "measurements.json", curves, usage):
        if path is not None:
            tracker.log_artifact(path)
    tracker.log_artifact(run_dir / "pruned_model", "pruned_model")
    tracker.log_artifact(run_dir / "masks.safetensors")


SCALAR_METRICS = ("accuracy", "top5", "loss", "params", "macs", "size_bytes", "throughput")
