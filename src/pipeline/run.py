"""One pipeline run, top to bottom: baseline -> prune -> speedup -> finetune -> measure."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline.cache import cache_key
from pipeline.config import asked_budget, plain
from pipeline.data import DataSplits, StageInputs, make_loaders
from pipeline.errors import UnsupportedModelError
from pipeline.export import build_from_config, export_onnx, save_pruned
from pipeline.files import atomic_path, write_json
from pipeline.jobs import RECORD_FILE, config_identity
from pipeline.model_stats import count_params
from pipeline.monitor import StageMonitor
from pipeline.plots import resource_usage, training_curves
from pipeline.report import summary_table
from pipeline.schema import RunSettings
from pipeline.stages.baseline import baseline
from pipeline.stages.budget import achieved as budget_achieved
from pipeline.stages.budget import sparsity_for_budget
from pipeline.stages.finetune import finetune, split_epochs
from pipeline.stages.iterative import prune_in_steps
from pipeline.stages.measure import measure, quality
from pipeline.stages.prune import save_masks
from pipeline.tracking import NullTracker, Tracker
from pipeline.training import evaluate

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_stage(seed: int, stage: str) -> None:
    """Seed the global generators from the run's seed and the stage's name, so that a stage
    draws the same numbers whatever the stages before it drew: a run whose baseline came from
    the cache prunes and fine-tunes exactly like the run that trained it."""
    digest = hashlib.sha256(f"{seed}/{stage}".encode()).digest()
    seed_everything(int.from_bytes(digest[:4], "little"))


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        log.warning("device=cuda requested but no CUDA device is present; using the CPU")
        return torch.device("cpu")
    return torch.device(choice)


def baseline_cache_path(settings: RunSettings) -> Path | None:
    """Where a baseline trained from these settings is cached: a hash of everything that
    decides its weights (model, data, the training settings, the loss, the batch cap, the seed)."""
    if not settings.baseline.cache or settings.baseline.checkpoint:
        return None
    training = {
        key: value
        for key, value in plain(settings)["baseline"].items()
        # The memory layout changes float rounding, not the recipe (as the device does not).
        if key not in ("checkpoint", "cache", "convergence", "channels_last")
    }
    key = cache_key(
        settings.model,
        settings.dataset,
        training,
        settings.criterion,
        settings.max_batches,
        settings.seed,
    )
    return Path(settings.paths.cache_dir) / "baselines" / f"{key}.safetensors"


def run(settings: RunSettings, run_dir: Path, tracker: Tracker | None = None) -> dict:
    """All five stages; `tracker` (MLflow, or nothing) sees every stage, metric and file."""
    tracker = tracker or NullTracker()
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    device = resolve_device(settings.device.value)
    on_cuda = settings.pruner.pruning_on_cuda and torch.cuda.is_available()
    prune_device = torch.device("cuda") if on_cuda else torch.device("cpu")

    splits: DataSplits = instantiate(settings.dataset)
    criterion = instantiate(settings.criterion)

    def inputs(batch_size: int, on: torch.device) -> StageInputs:
        loaders = make_loaders(
            splits, batch_size, settings.seed, settings.num_workers, settings.max_batches
        )
        return StageInputs(loaders, criterion, on, splits.input_shape)

    baseline_inputs = inputs(settings.baseline.batch_size, device)
    prune_inputs = inputs(settings.pruner.batch_size, prune_device)
    finetune_inputs = inputs(settings.finetune.batch_size, device)
    # Both models are evaluated on these very batches: the accuracy comparison is paired.
    test_loader = finetune_inputs.loaders.test

    with StageMonitor(settings.tracking.sample_interval_s, tracker) as monitor:
        with monitor.stage("baseline"):
            seed_stage(settings.seed, "baseline")
            base = baseline(
                build_from_config(settings.model, trusted=[settings.model["_target_"]]),
                baseline_inputs,
                settings.baseline,
                baseline_cache_path(settings),
            )
            baseline_quality = quality(base.model, test_loader, baseline_inputs)
        if base.convergence is not None:
            tracker.set_tags({"baseline.converged": str(base.convergence.converged).lower()})

        # finetune.between_steps epochs after each pruning step but the last, the rest after it.
        between_epochs, final_epochs = split_epochs(settings.finetune, settings.pruner.iterations)

        def tune_between(index: int, model: torch.nn.Module) -> tuple[torch.nn.Module, float]:
            with monitor.stage("finetune"):
                seed_stage(settings.seed, f"finetune/step{index}")
                step_settings = dataclasses.replace(settings.finetune, epochs=between_epochs)
                tuned = finetune(model, finetune_inputs, step_settings, teacher=base.model)
            best = max(row["val_accuracy"] for row in tuned.history)
            return tuned.model.to(prune_inputs.device), best

        seed_stage(settings.seed, "prune")
        try:
            pruned_model, pruning = prune_stages(
                base.model,
                settings,
                prune_inputs,
                monitor,
                run_dir / "masks.safetensors",
                tune_between if between_epochs else None,
            )
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"{model_label(settings.model)}: {error}") from error

        with monitor.stage("finetune"):
            seed_stage(settings.seed, "finetune")
            tuned = finetune(
                pruned_model,
                finetune_inputs,
                dataclasses.replace(settings.finetune, epochs=final_epochs),
                teacher=base.model,
                on_epoch=lambda row: tracker.log_metrics(
                    {
                        "finetune.train_loss": row["train_loss"],
                        "finetune.val_accuracy": row["val_accuracy"],
                    },
                    step=row["epoch"],
                ),
            )

        with monitor.stage("measure"):
            seed_stage(settings.seed, "measure")
            measurements = measure(
                base.model,
                baseline_quality,
                tuned.model,
                test_loader,
                finetune_inputs,
                settings.measure,
                seed=settings.seed,
            )

    model_dir = save_pruned(
        tuned.model, settings.model, run_dir / "pruned_model", [settings.model["_target_"]]
    )
    if settings.measure.onnx:
        export_onnx(tuned.model, splits.input_shape, model_dir / "model.onnx")

    if pruning["budget"] is not None:
        kind = pruning["budget"]["kind"]
        final = budget_achieved(
            kind, measurements["baseline"], measurements["pruned"], measurements["latency_ratio"]
        )
        pruning["budget"] |= {"final": final, "met": final <= pruning["budget"]["target"]}
    record = measurements | {
        "stages": monitor.stage_seconds,
        "resources": monitor.stage_summaries,
        "baseline_source": base.source,
        "baseline_history": base.history,
        "baseline_convergence": base.convergence.as_dict() if base.convergence else None,
        "finetune_history": tuned.history,
        "finetune_best_epoch": tuned.best_epoch,
        "pruning": pruning,
        "device": device.type,
        "pruned_model": str(model_dir),
        "config": plain(settings),
        "config_identity": config_identity(settings),
    }
    write_json(record, run_dir / RECORD_FILE)
    write_outcome(tracker, record, monitor, run_dir)
    print(summary_table(record))
    return record


def model_label(model_settings) -> str:
    """model=torchvision model.name=resnet18, or the builder a config names."""
    name = model_settings.get("name")
    target = model_settings.get("_target_")
    return f"model.name={name}" if name else f"model._target_={target}"


def prune_stages(
    model: torch.nn.Module,
    settings: RunSettings,
    inputs: StageInputs,
    monitor: StageMonitor,
    masks_path: Path,
    tune_between=None,
) -> tuple[torch.nn.Module, dict]:
    """Stages 2 and 3 (in pruner.iterations steps), each step's size and validation accuracy
    logged; returns the physically smaller model and a summary for measurements.json.
    `tune_between(index, model) -> (model, best val accuracy)` fine-tunes after every step but
    the last (finetune.between_steps)."""
    steps = []
    sparsity, search = settings.sparsity, None
    if asked_budget(settings.budget) is not None:
        with monitor.stage("prune"):  # the search prunes too
            search = sparsity_for_budget(
                model, inputs, settings.pruner, settings.budget, settings.measure
            )
        sparsity = search.sparsity
        log.info(
            "budget.%s=%s: sparsity %.4f (%s ratio %.4f, %d prunings, round_to %s)",
            search.kind,
            search.target,
            sparsity,
            search.kind,
            search.achieved,
            len(search.evaluations),
            search.round_to,
        )

    def after_step(index: int, current: torch.nn.Module, recalibrated: bool) -> None:
        val = evaluate(current, inputs.loaders.val, inputs.criterion, inputs.device, "val")
        # Under pruner.recalibrate=last_step the steps before the last run on the unpruned
        # network's BatchNorm statistics: their accuracy says little of what the step cost.
        row = {
            "step": index,
            "params": count_params(current),
            "val_accuracy": val.accuracy,
            "batchnorm_reestimated": recalibrated,
        }
        steps.append(row)
        monitor.tracker.log_metrics(
            {
                "prune_step.params": row["params"],
                "prune_step.val_accuracy": val.accuracy,
                "prune_step.batchnorm_reestimated": float(recalibrated),
            },
            step=index,
        )
        log.info("prune step %d/%d: %s", index, settings.pruner.iterations, row)

    # The budget search may have landed only with a finer rounding than pruner.round_to.
    pruner = (
        settings.pruner
        if search is None
        else dataclasses.replace(settings.pruner, round_to=search.round_to)
    )

    def between(index: int, current: torch.nn.Module) -> torch.nn.Module:
        tuned, accuracy = tune_between(index, current)
        steps[-1]["finetuned_val_accuracy"] = accuracy
        monitor.tracker.log_metrics({"prune_step.finetuned_val_accuracy": accuracy}, step=index)
        log.info(
            "prune step %d/%d: fine-tuned, val accuracy %.4f", index, pruner.iterations, accuracy
        )
        return tuned

    result = prune_in_steps(
        model,
        inputs,
        pruner,
        sparsity,
        stage=monitor.stage,
        on_step=after_step,
        between=between if tune_between is not None else None,
    )
    save_masks(result.masks_by_step, masks_path)
    summary = {
        "config_list": result.config_list,
        "device": inputs.device.type,
        "iterations": settings.pruner.iterations,
        "finetune_between_steps": 0 if tune_between is None else settings.finetune.between_steps,
        "steps": steps,
        "sparsity": sparsity,
        "budget": None if search is None else search.as_dict(),
    }
    return result.model, summary


def write_outcome(tracker: Tracker, record: dict, monitor: StageMonitor, run_dir: Path) -> None:
    """Plots and the config beside measurements.json, and the metrics, curves and files of a
    finished run for side-by-side comparison in the tracker."""
    with atomic_path(run_dir / "config.yaml") as staging:
        OmegaConf.save(OmegaConf.create(record["config"]), staging)
    curves = training_curves(
        {"baseline": record["baseline_history"], "finetune": record["finetune_history"]},
        run_dir / "training_curves.png",
    )
    usage = resource_usage(monitor.samples, run_dir / "resource_usage.png")

    metrics = {f"reduction.{key}_pct": value for key, value in record["reduction_pct"].items()}
    metrics["accuracy_drop_points"] = record["accuracy_drop_points"]
    metrics["sparsity"] = record["pruning"]["sparsity"]
    budget = record["pruning"]["budget"]
    if budget is not None:
        metrics |= {"budget.target": budget["target"], "budget.achieved": budget["final"]}
    change, ratio = record["accuracy_change"], record["latency_ratio"]
    metrics |= {
        "accuracy_change_points": change["points"],
        "accuracy_change_ci_low": change["ci_low"],
        "accuracy_change_ci_high": change["ci_high"],
        "accuracy_change_p_value": change["p_value"],
        "latency_ratio": ratio["ratio"],
        "latency_ratio_ci_low": ratio["ci_low"],
        "latency_ratio_ci_high": ratio["ci_high"],
    }
    if record["baseline_convergence"] is not None:
        metrics["baseline.converged"] = float(record["baseline_convergence"]["converged"])
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
    for path in (run_dir / "config.yaml", run_dir / RECORD_FILE, curves, usage):
        if path is not None:
            tracker.log_artifact(path)
    tracker.log_artifact(run_dir / "pruned_model", "pruned_model")
    tracker.log_artifact(run_dir / "masks.safetensors")


SCALAR_METRICS = ("accuracy", "top5", "loss", "params", "macs", "size_bytes", "throughput")
