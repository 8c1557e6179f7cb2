"""One pipeline run, top to bottom: baseline -> prune -> speedup -> finetune -> measure."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline.config.identity import config_identity
from pipeline.config.schema import RunSettings, asked_budget, plain
from pipeline.data.datasets import DataSplits, StageInputs, make_loaders
from pipeline.errors import PipelineError, UnsupportedModelError
from pipeline.files import atomic_path, write_json
from pipeline.models.baseline_cache import baseline_cache_path
from pipeline.models.pruned import export_onnx, save_pruned
from pipeline.models.stats import count_params
from pipeline.models.zoo import build_from_config
from pipeline.out_of_memory import guarded_stages
from pipeline.pruning.budget import BudgetSearch, sparsity_for_budget, within_budget
from pipeline.pruning.budget import achieved as budget_achieved
from pipeline.pruning.engine import engine_for
from pipeline.pruning.steps import prune_step
from pipeline.report import summary_table
from pipeline.report.run_plots import resource_usage, training_curves
from pipeline.stages.baseline import baseline
from pipeline.stages.finetune import finetune, split_epochs
from pipeline.stages.measure import measure, quality
from pipeline.stages.prune import save_masks
from pipeline.sweeps.outcomes import RECORD_FILE
from pipeline.tracking.dataset_input import dataset_record
from pipeline.tracking.monitor import StageMonitor
from pipeline.tracking.tracker import NullTracker, Tracker
from pipeline.training.distributed import (
    SINGLE,
    World,
    broadcast_json,
    check_same_model,
    resolve_precision,
    share_model,
)
from pipeline.training.loop import evaluate
from pipeline.training.seeding import seed_everything, seed_stage

log = logging.getLogger(__name__)


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        log.warning("device=cuda requested but no CUDA device is present; using the CPU")
        return torch.device("cpu")
    return torch.device(choice)


def stage_inputs(
    settings: RunSettings,
    splits: DataSplits,
    criterion,
    batch_size: int,
    device: torch.device,
    world: World = SINGLE,
) -> StageInputs:
    """A stage's loaders (shuffled from settings.seed; sharded over the ranks of `world`), loss
    and device."""
    loaders = make_loaders(
        splits, batch_size, settings.seed, settings.num_workers, settings.max_batches, world
    )
    return StageInputs(loaders, criterion, device, splits.input_shape)


def run(
    settings: RunSettings, run_dir: Path, tracker: Tracker | None = None, world: World = SINGLE
) -> dict | None:
    """All five stages; `tracker` (MLflow, or nothing) sees every stage, metric and file.
    Over several ranks (`world`, trainer=ddp), the baseline and the fine-tuning train on all of
    them, and rank 0 alone prunes, measures and writes; the others return None."""
    tracker = tracker or NullTracker()
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    device = resolve_device(settings.device.value)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    precision = resolve_precision(settings.trainer.precision, device)
    on_cuda = settings.pruner.pruning_on_cuda and torch.cuda.is_available()
    prune_device = torch.device("cuda", world.local_rank) if on_cuda else torch.device("cpu")
    trusted = [settings.model["_target_"]]

    splits: DataSplits = build_dataset(settings.dataset)
    tracker.log_dataset(dataset_record(dict(settings.dataset), splits))
    skipped = splits.bad_files.as_dict() if splits.bad_files and splits.bad_files.count else None
    if skipped is not None:  # dataset.bad_files=skip left images out: the run says so
        tracker.set_tags({"data.bad_files_skipped": str(skipped["count"])})
    criterion = instantiate(settings.criterion)

    baseline_inputs = stage_inputs(
        settings, splits, criterion, settings.baseline.batch_size, device, world
    )
    prune_inputs = stage_inputs(
        settings, splits, criterion, settings.pruner.batch_size, prune_device
    )
    finetune_inputs = stage_inputs(
        settings, splits, criterion, settings.finetune.batch_size, device, world
    )
    # Both models are evaluated on these very batches: the accuracy comparison is paired.
    test_loader = finetune_inputs.loaders.test

    # Rank 0 samples every GPU of its node that the job uses, not only its own.
    gpus = settings.trainer.devices if world.distributed else 1
    with StageMonitor(settings.tracking.sample_interval_s, tracker, gpus) as monitor:
        # Each stage timed, and its out-of-memory errors said in one line with the batch size.
        stage = guarded_stages(monitor.stage, settings)
        # 1. baseline
        with stage("baseline"):
            seed_stage(settings.seed, "baseline")
            base = baseline(
                build_from_config(settings.model, trusted=trusted),
                baseline_inputs,
                settings.baseline,
                baseline_cache_path(settings),
                world,
                precision,
            )
            if world.main:
                baseline_quality = quality(
                    base.model, test_loader, baseline_inputs, settings.measure
                )
        if base.convergence is not None:
            tracker.set_tags({"baseline.converged": str(base.convergence.converged).lower()})

        # 2 + 3. prune and speed up, in pruner.iterations steps, to a sparsity or a budget
        seed_stage(settings.seed, "prune")
        sparsity, search, pruner = settings.sparsity, None, settings.pruner
        if asked_budget(settings.budget) is not None:
            if world.main:
                with stage("prune"):  # the search prunes too
                    search = sparsity_for_budget(
                        base.model, prune_inputs, pruner, settings.budget, settings.measure
                    )
                log.info(search.describe())
            found = broadcast_json(
                [search.sparsity, search.round_to] if world.main else None, world
            )
            sparsity = found[0]
            # The search may have landed only with a finer rounding than pruner.round_to.
            pruner = dataclasses.replace(pruner, round_to=found[1])
        # finetune.between_steps epochs after each pruning step but the last, the rest after it.
        between_epochs, final_epochs = split_epochs(settings.finetune, pruner.iterations)
        current, tied = copy.deepcopy(base.model), None
        steps, masks_by_step, config_list = [], [], []
        for index in range(1, pruner.iterations + 1):
            if world.main:  # pruning and speedup run on one process
                try:
                    step = prune_step(
                        current.to(prune_device), prune_inputs, pruner, sparsity, index, tied, stage
                    )
                except UnsupportedModelError as error:
                    label = model_label(settings.model)
                    raise UnsupportedModelError(f"{label}: {error}") from error
                current, tied, config_list = step.model, step.tied, step.config_list
                masks_by_step.append(step.masks)
                val = evaluate(current, prune_inputs.loaders.val, criterion, prune_device, "val")
                steps.append(
                    {
                        "step": index,
                        "params": count_params(current),
                        "val_accuracy": val.accuracy,
                        "batchnorm_reestimated": step.recalibrated,
                    }
                )
            if world.distributed:  # every rank fine-tunes rank 0's pruned model, checked
                current = share_model(current, settings.model, trusted, world, device)
                check_same_model(current, world, f"pruning step {index}")
            if between_epochs and index < pruner.iterations:
                with stage("finetune"):
                    seed_stage(settings.seed, f"finetune/step{index}")
                    tuned = finetune(
                        current,
                        finetune_inputs,
                        dataclasses.replace(settings.finetune, epochs=between_epochs),
                        teacher=base.model,
                        world=world,
                        precision=precision,
                    )
                current = tuned.model
                if world.main:
                    current = current.to(prune_device)
                    best = max(r["val_accuracy"] for r in tuned.history)
                    steps[-1]["finetuned_val_accuracy"] = best
            if world.main:
                log_prune_step(tracker, steps[-1], pruner.iterations)
        if world.main:
            save_masks(masks_by_step, run_dir / "masks.safetensors")

        # 4. finetune
        with stage("finetune"):
            seed_stage(settings.seed, "finetune")
            tuned = finetune(
                current,
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
                world=world,
                precision=precision,
            )
        if not world.main:  # rank 0 measures and writes; the others wait for it at the end
            return None

        # 5. measure
        with stage("measure"):
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

    model_dir = save_pruned(tuned.model, settings.model, run_dir / "pruned_model", trusted)
    if settings.measure.onnx:
        export_onnx(tuned.model, splits.input_shape, model_dir / "model.onnx")

    engine = engine_for(settings.pruner)
    pruning = {
        "engine": engine.name,
        # Torch-Pruning removes the channels as it ranks them: the speedup stage then only
        # re-estimates BatchNorm statistics. Said here, so the stage is not silently empty.
        "speedup": "done while pruning" if engine.narrows_while_ranking else "ModelSpeedup",
        "config_list": config_list,
        "device": prune_device.type,
        "iterations": settings.pruner.iterations,
        "finetune_between_steps": settings.finetune.between_steps if between_epochs else 0,
        "steps": steps,
        "sparsity": sparsity,
        "budget": None if search is None else budget_summary(search, measurements),
    }
    record = measurements | {
        "stages": monitor.stage_seconds,
        "resources": monitor.stage_summaries,
        "baseline_source": base.source,
        "bad_files_skipped": skipped,
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
    metrics = final_metrics(record)
    if settings.tracking.log_model:  # first: the record then names the models it logged
        models = log_models(tracker, settings, splits, base.model, model_dir, metrics, run_dir)
        record["mlflow_models"] = models or None
    write_json(record, run_dir / RECORD_FILE)
    log_finished_run(tracker, record, monitor, run_dir, metrics)
    print(summary_table(record))
    return record


def build_dataset(node) -> DataSplits:
    """The dataset's splits; a builder's own one-line error (a bad image, a missing file)
    comes through as itself, not inside Hydra's InstantiationException."""
    try:
        return instantiate(node)
    except InstantiationException as error:
        if isinstance(error.__cause__, PipelineError):
            raise error.__cause__ from None
        raise


def model_label(model_settings) -> str:
    """model=torchvision model.name=resnet18, or the builder a config names."""
    name = model_settings.get("name")
    target = model_settings.get("_target_")
    return f"model.name={name}" if name else f"model._target_={target}"


def log_prune_step(tracker: Tracker, row: dict, iterations: int) -> None:
    """One pruning step's size and validation accuracy (and, with finetune.between_steps, its
    accuracy after the fine-tuning that followed it)."""
    # Under pruner.recalibrate=last_step the steps before the last run on the unpruned
    # network's BatchNorm statistics: their accuracy says little of what the step cost.
    metrics = {
        "prune_step.params": row["params"],
        "prune_step.val_accuracy": row["val_accuracy"],
        "prune_step.batchnorm_reestimated": float(row["batchnorm_reestimated"]),
    }
    if "finetuned_val_accuracy" in row:
        metrics["prune_step.finetuned_val_accuracy"] = row["finetuned_val_accuracy"]
    tracker.log_metrics(metrics, step=row["step"])
    log.info("prune step %d/%d: %s", row["step"], iterations, row)


def log_models(
    tracker: Tracker,
    settings: RunSettings,
    splits: DataSplits,
    baseline_model: torch.nn.Module,
    model_dir: Path,
    metrics: dict[str, float],
    run_dir: Path,
) -> dict[str, dict[str, str]]:
    """The pruned network (and with tracking.log_baseline_model the unpruned one) as MLflow
    models, each with the metrics that describe it and one test image as its input example;
    returns what the tracker says of each (model id, UI address)."""
    if isinstance(tracker, NullTracker):
        return {}
    from pipeline.tracking.logged_model import ModelToLog

    target = settings.model["_target_"]
    trusted = [] if target.startswith("pipeline.models.") else [target]
    example = splits.test[0][0].unsqueeze(0).float().numpy()
    onnx_path = model_dir / "model.onnx" if settings.measure.onnx else None
    # The figures that decide between models first: the Models tab shows them in this order.
    first = ("pruned.accuracy", "accuracy_change_points", "macs_ratio", "latency_ratio")
    rest = ("pruned.", "reduction.", "accuracy_change", "latency_ratio", "params_ratio")
    pruned_metrics = {key: metrics[key] for key in first if key in metrics} | {
        key: value for key, value in metrics.items() if key.startswith(rest)
    }
    models = [
        ModelToLog(
            "pruned", model_dir, example, splits.num_classes, pruned_metrics, trusted, onnx_path
        )
    ]
    if settings.tracking.log_baseline_model:
        baseline_dir = save_pruned(
            baseline_model, settings.model, run_dir / "baseline_model", [target]
        )
        baseline_metrics = {k: v for k, v in metrics.items() if k.startswith("baseline.")}
        models.append(
            ModelToLog(
                "baseline", baseline_dir, example, splits.num_classes, baseline_metrics, trusted
            )
        )
    logged = {}
    for model in models:
        logged |= tracker.log_model(model, run_dir)
    return logged


def budget_summary(search: BudgetSearch, measurements: dict) -> dict:
    """The budget search, and the final model's ratio as the measure stage found it."""
    final = budget_achieved(
        search.kind, measurements["baseline"], measurements["pruned"], measurements["latency_ratio"]
    )
    met = within_budget(search.kind, search.target, search.tolerance, final, search.fallback)
    return search.as_dict() | {"final": final, "met": met}


def final_metrics(record: dict) -> dict[str, float]:
    """The scalar metrics of a finished run, by name, from its record."""
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
    for row in record.get("latency_by_batch", []):  # absent from records before batch sizes
        size = f"_b{row['batch_size']}"
        metrics |= {
            f"latency_ratio{size}": row["ratio"],
            f"latency_ratio{size}_ci_low": row["ci_low"],
            f"latency_ratio{size}_ci_high": row["ci_high"],
        }
        for side in ("baseline", "pruned"):
            metrics[f"{side}.latency_p50_ms{size}"] = row[f"{side}_ms"]["p50"]
        memory = row.get("peak_memory_mb") or {}
        if memory.get("baseline") and memory.get("pruned") is not None:
            metrics[f"peak_memory_ratio{size}"] = memory["pruned"] / memory["baseline"]
            for side in ("baseline", "pruned"):
                metrics[f"{side}.peak_memory_mb{size}"] = memory[side]
    if record["baseline_convergence"] is not None:
        metrics["baseline.converged"] = float(record["baseline_convergence"]["converged"])
    for side in ("baseline", "pruned"):
        report = record[side]
        metrics |= {f"{side}.{key}": report[key] for key in SCALAR_METRICS}
        metrics[f"{side}.latency_p50_ms"] = report["latency_ms"]["p50"]
        metrics[f"{side}.latency_p90_ms"] = report["latency_ms"]["p90"]
    for kind in ("macs", "params"):  # what a budget is set in: the pruned model's share
        if record["baseline"][kind]:
            metrics[f"{kind}_ratio"] = record["pruned"][kind] / record["baseline"][kind]
    return metrics


def log_finished_run(
    tracker: Tracker, record: dict, monitor: StageMonitor, run_dir: Path, metrics: dict
) -> None:
    """Plots and the config beside measurements.json, and the metrics, curves and files of a
    finished run for side-by-side comparison in the tracker."""
    with atomic_path(run_dir / "config.yaml") as staging:
        OmegaConf.save(OmegaConf.create(record["config"]), staging)
    curves = training_curves(
        {"baseline": record["baseline_history"], "finetune": record["finetune_history"]},
        run_dir / "training_curves.png",
    )
    usage = resource_usage(monitor.samples, run_dir / "resource_usage.png")
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
