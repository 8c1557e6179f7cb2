"""Recipe benchmark at equal cost: every recipe pruned to the same MACs budgets, same baseline.

    python benchmarks/recipe.py [hydra overrides ...] [--budgets 0.7 0.5 0.35 0.25]
                                [--seeds 1234 1235] [--train-limit 8000]
                                [--baseline-epochs 80] [--finetune-epochs 12]
                                [--recipes reference default torch_pruning]
                                [--output-root outputs/benchmarks/recipe] [--plot PNG] [--json PATH]

On Fashion-MNIST (Debian's dataset-fashion-mnist) one baseline is trained and cached (with the
first seed; dataset.seed is pinned to it, so every seed shares the baseline, the split and the
test set, and the seed changes only the pruning statistics batches and the fine-tuning order).
At each MACs budget B (a ratio of the baseline's MACs), for each seed:
- reference: NNI one-shot pruning as it is (pruner.iterations=1, pruner.round_to=null,
  pruner.statistics=nni, pruner.activation=relu, no BatchNorm re-estimation) and
  finetune=reference, with budget.macs=B (the pipeline searches the sparsity);
- default: the project's defaults with budget.macs=B;
- torch_pruning: Torch-Pruning 1.6.1's magnitude pruning as its README recommends
  (tp.pruner.BasePruner, tp.importance.GroupMagnitudeImportance(p=2), the final Linear ignored,
  channels rounded to 8) in --tp-steps iterative steps, its pruning_ratio searched until the
  MACs ratio lands in [B - budget.tolerance, B] (unrounded where rounded counts jump across
  that window), then the project's default fine-tuning and measurement
  (pip install -e ".[benchmarks]");
and once per seed a control: the baseline itself fine-tuned with the same budget, unpruned. Every
run fine-tunes for --finetune-epochs. Each run's row is cached as JSON under --output-root with
the seconds it took, so an interrupted benchmark resumes where it stopped and still states its
cost; rows are keyed by what their recipe resolves to (recipe_key), so a changed pruner default
recomputes the default's and the reference's rows and keeps Torch-Pruning's and the controls'.
--no-control skips the controls, for trying a recipe change.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as common
import torch
from hydra.utils import instantiate
from torch import nn

from pipeline.config import plain
from pipeline.data import DataSplits, StageInputs, make_loaders
from pipeline.export import build_from_config
from pipeline.model_stats import count_macs
from pipeline.run import baseline_cache_path, resolve_device, run, seed_everything, seed_stage
from pipeline.schema import RunSettings
from pipeline.stages.baseline import BaselineResult, baseline
from pipeline.stages.budget import SEARCH_METHOD, find_sparsity
from pipeline.stages.finetune import finetune, split_epochs
from pipeline.stages.measure import measure, quality
from pipeline.tracking import cpu_model

# Hydra overrides of each recipe the pipeline runs; torch_pruning and the control take the
# project's defaults for everything they share with it (fine-tuning and measurement).
RECIPES = {
    "reference": [
        "finetune=reference",
        "pruner.round_to=null",
        "pruner.statistics=nni",
        "pruner.iterations=1",
        "pruner.recalibration_batches=0",
        "pruner.activation=relu",
        "pruner.sparsity_scale=[]",
    ],
    "default": [],
    "torch_pruning": [],
}
CONTROL = "control"
PIPELINE_RECIPES = ("reference", "default")
# The summary's targets (the issue's): points lost by the default at MACs 0.5; the default's
# loss as a share of the reference's at 0.35 and 0.25; the control's gain above which the
# baseline is called not converged.
DEFAULT_LOSS_TARGET = 0.5
LOSS_SHARE_BUDGETS = (0.35, 0.25)
LOSS_SHARE_TARGET = 1 / 3
CONTROL_GAIN_LIMIT = 0.3
TP_VERSION = "1.6.1"


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra overrides (key=value, ~key) apart from the options, wherever they stand: after
    `--seeds 1 2` argparse would read `max_batches=2` as a seed."""
    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    return [a for a in argv if a not in overrides], overrides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--train-limit", type=int, default=8000)
    parser.add_argument(
        "--baseline-epochs",
        type=int,
        default=80,
        help="baseline.epochs (80: converged on 8,000 images, val flat over the last 3 epochs, "
        "and fine-tuning the unpruned baseline adds 0.24 points; 23 min on 2 cores; at 40 it "
        "added 0.35); the output says whether the baseline converged",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=12,
        help="finetune.epochs of every run (12: the whole benchmark within 2 hours on 2 cores)",
    )
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="skip the control rows (for trying a recipe change; the table then cannot say "
        "whether the baseline is converged)",
    )
    parser.add_argument("--tp-steps", type=int, default=4, help="Torch-Pruning iterative_steps")
    parser.add_argument(
        "--tp-round-to",
        type=int,
        default=8,
        help="Torch-Pruning round_to (its README's advice; 0: none); where rounded counts "
        "cannot land within budget.tolerance of a budget, that budget is pruned unrounded",
    )
    parser.add_argument("--output-root", type=Path, default=Path("outputs/benchmarks/recipe"))
    parser.add_argument("--plot", type=Path, default=None, help="default: <output-root>/...")
    parser.add_argument("--json", type=Path, default=None, help="write rows and aggregates here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    options, overrides = split_argv(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(options)
    args.overrides = [*args.overrides, *overrides]
    if args.plot is None:
        args.plot = args.output_root / "recipe_pareto.png"
    return args


# --- settings and the cached baseline ---------------------------------------------------------


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """What every run shares. dataset.seed is pinned to the first seed: one split, one test
    set and (with the baseline checkpoint) one baseline for all seeds."""
    return [
        "dataset=fashion_mnist",
        f"dataset.train_limit={args.train_limit}",
        f"dataset.seed={args.seeds[0]}",
        f"baseline.epochs={args.baseline_epochs}",
        f"finetune.epochs={args.finetune_epochs}",
        "tracking=none",
        f"paths.output_root={args.output_root}",
    ]


def settings_for(
    args: argparse.Namespace, seed: int, recipe: str, extra: list[str] = ()
) -> RunSettings:
    overrides = [*shared_overrides(args), f"seed={seed}", *RECIPES[recipe], *extra]
    return common.project_settings([*overrides, *args.overrides])


def without_empty(value: Any) -> Any:
    """`value` less the keys, at any depth, whose values are empty mappings or lists: an option
    added to conf/ later with a value that changes nothing ({}) keeps the rows cached before."""
    if isinstance(value, dict):
        return {k: without_empty(v) for k, v in value.items() if v != {} and v != []}
    return value


# Options added to conf/ after rows were cached, at the value that leaves a run as it was:
# settings at that value stay out of a row's key, so those rows stay valid.
ADDED_NEUTRAL = {("finetune", "dropout"): "keep", ("finetune", "ema_decay"): 0.0}


def without_neutral(settings: dict) -> dict:
    """`settings` less the ADDED_NEUTRAL options that hold their neutral value."""
    kept = {
        key: dict(value) if isinstance(value, dict) else value for key, value in settings.items()
    }
    for (section, option), neutral in ADDED_NEUTRAL.items():
        value = kept.get(section, {}).get(option)
        if value is not None and getattr(value, "value", value) == neutral:
            del kept[section][option]
    return kept


def recipe_key(args: argparse.Namespace, recipe: str) -> str:
    """Everything the rows of `recipe` (or of the control) depend on besides budget and seed:
    the arguments and the settings that recipe resolves to. torch_pruning and the control
    share the pipeline's fine-tuning and measurement, not its pruner: a changed pruner default
    in conf/ starts fresh rows for the recipes that prune with it, and keeps the others."""
    prunes = recipe in PIPELINE_RECIPES
    settings = without_neutral(
        plain(settings_for(args, args.seeds[0], recipe if prunes else "default"))
    )
    identity = {
        "recipe": recipe,
        # Resolved, overrides included; the seed of a row is in its name.
        "settings": without_empty(
            {
                key: value
                for key, value in settings.items()
                if key != "seed" and (prunes or key != "pruner")
            }
        ),
        "train_limit": args.train_limit,
        "baseline_epochs": args.baseline_epochs,
        "finetune_epochs": args.finetune_epochs,
        "baseline_seed": args.seeds[0],
    }
    if recipe == "torch_pruning":
        identity["tp"] = [TP_VERSION, args.tp_steps, args.tp_round_to]
    text = json.dumps(identity, sort_keys=True, default=str)
    return f"{recipe}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


_SPLITS: dict[str, DataSplits] = {}


def splits_for(settings: RunSettings) -> DataSplits:
    """The dataset splits (identical for every run: dataset.seed is pinned), read once."""
    key = json.dumps(plain(settings)["dataset"], sort_keys=True, default=str)
    if key not in _SPLITS:
        _SPLITS[key] = instantiate(settings.dataset)
    return _SPLITS[key]


def stage_inputs(settings: RunSettings, batch_size: int, device: torch.device) -> StageInputs:
    """As pipeline.run builds each stage's inputs: loaders shuffled from settings.seed."""
    splits = splits_for(settings)
    loaders = make_loaders(
        splits, batch_size, settings.seed, settings.num_workers, settings.max_batches
    )
    return StageInputs(loaders, instantiate(settings.criterion), device, splits.input_shape)


def load_baseline(settings: RunSettings, inputs: StageInputs, cache: Path | None) -> BaselineResult:
    model = build_from_config(settings.model, trusted=[settings.model["_target_"]])
    return baseline(model, inputs, settings.baseline, cache)


def ensure_baseline(args: argparse.Namespace) -> dict:
    """Train (or find) the one baseline, with the first seed, exactly as pipeline.run would
    (same seeding, same cache entry); every run then loads it as baseline.checkpoint."""
    settings = settings_for(args, args.seeds[0], "default")
    path = baseline_cache_path(settings)
    if path is None:
        raise SystemExit("recipe.py needs baseline.cache=true and no baseline.checkpoint")
    info_path = path.with_suffix(".benchmark.json")
    seed_everything(settings.seed)
    inputs = stage_inputs(settings, settings.baseline.batch_size, resolve_device("auto"))
    seed_stage(settings.seed, "baseline")
    began = time.perf_counter()
    result = load_baseline(settings, inputs, path)
    seconds = time.perf_counter() - began
    if result.source == "trained":
        info_path.write_text(json.dumps({"seconds": seconds}))
    earlier = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return {
        "path": path,
        "source": result.source,
        "train_seconds": seconds if result.source == "trained" else earlier.get("seconds"),
        "convergence": result.convergence.as_dict() if result.convergence else None,
    }


# --- one row per run ---------------------------------------------------------------------------


def row_from(measurements: dict, **fields) -> dict:
    """The table's figures from a measure-stage result (a run record or measure()'s output)."""
    base, pruned = measurements["baseline"], measurements["pruned"]
    change, latency = measurements["accuracy_change"], measurements["latency_ratio"]
    return fields | {
        "baseline_accuracy": base["accuracy"],
        "accuracy": pruned["accuracy"],
        "points_lost": 100.0 * (base["accuracy"] - pruned["accuracy"]),
        "change_points": change["points"],
        "change_ci": [change["ci_low"], change["ci_high"]],
        "macs_ratio": pruned["macs"] / base["macs"],
        "params_ratio": pruned["params"] / base["params"],
        "latency_ratio": latency["ratio"],
        "latency_ci": [latency["ci_low"], latency["ci_high"]],
    }


def pipeline_row(args, recipe: str, budget: float, seed: int, checkpoint: Path, where: Path):
    """One pipeline run with budget.macs=budget: the pipeline's own search finds the sparsity."""
    overrides = [f"budget.macs={budget}", f"baseline.checkpoint={checkpoint}"]
    record = run(settings_for(args, seed, recipe, overrides), where)
    search = record["pruning"]["budget"]
    return row_from(
        record,
        sparsity=record["pruning"]["sparsity"],
        met=bool(search["met"]),
        evaluations=len(search["evaluations"]),
        search="pipeline",
        finetune_seconds=record["stages"]["finetune"]["seconds"],
    )


def torch_pruning_model(
    model: nn.Module,
    ratio: float,
    shape: tuple[int, ...],
    steps: int,
    round_to: int | None,
    between: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Torch-Pruning's recommended magnitude pruning of a copy of `model`: BasePruner with
    GroupMagnitudeImportance(p=2) (group L2 norm), every layer at `ratio` of its channels in
    `steps` iterative steps, the classifier's final Linear left whole. `between(index, model)`
    fine-tunes in place after every step but the last, where its README's loop says
    "finetune your model here" (the pipeline's finetune.between_steps)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).cpu().eval()
    final = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
    pruner = tp.pruner.BasePruner(
        model,
        torch.randn(1, *shape),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=[final],
        round_to=round_to,
    )
    for index in range(1, steps + 1):
        pruner.step()
        if between is not None and index < steps:
            between(index, model)
            model.cpu().eval()
    return model


def require_torch_pruning() -> None:
    """Torch-Pruning is a benchmark-only dependency (the `benchmarks` extra): one clear line
    when it is missing, a warning when it is another version than the one compared."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("torch-pruning")
    except PackageNotFoundError:
        raise SystemExit(
            "the torch_pruning recipe needs Torch-Pruning: pip install -e '.[benchmarks]' "
            f"(torch-pruning=={TP_VERSION}), or leave it out with --recipes reference default"
        ) from None
    if found != TP_VERSION:
        print(f"# warning: torch-pruning {found}, not {TP_VERSION}", file=sys.stderr)


def torch_pruning_to_budget(
    base: nn.Module,
    budget: float,
    shape: tuple[int, ...],
    tolerance: float,
    steps: int,
    round_to: int,
    between: Callable[[int, nn.Module], None] | None = None,
) -> tuple[nn.Module, dict]:
    """torch_pruning_model with its pruning_ratio searched (pipeline.stages.budget's
    find_sparsity) until the MACs ratio lands in [budget - tolerance, budget]. Channels rounded
    to `round_to` move many layers at once, so the ratio can jump across that window
    (MobileNetV2 at 0.25: 0.262 -> 0.212); the search then runs again unrounded (round_to 0:
    unrounded from the start). Widths do not depend on the weights, so the search prunes
    without `between`."""
    base_macs = count_macs(base, shape)
    count = 0
    for rounding in dict.fromkeys([round_to or None, None]):

        def ratio_at(pruning_ratio: float, rounding=rounding) -> float:
            pruned = torch_pruning_model(base, pruning_ratio, shape, steps, rounding)
            return count_macs(pruned, shape) / base_macs

        ratio, achieved, evaluations = find_sparsity(
            ratio_at, budget, tolerance, "torch_pruning MACs"
        )
        count += len(evaluations)
        if achieved >= budget - tolerance:
            break
    model = torch_pruning_model(base, ratio, shape, steps, rounding, between)
    return model, {"sparsity": ratio, "evaluations": count, "tp_round_to": rounding}


def torch_pruning_row(args, budget: float, seed: int, checkpoint: Path) -> dict:
    settings = settings_for(args, seed, "torch_pruning", [f"baseline.checkpoint={checkpoint}"])

    def prune(base: nn.Module, inputs: StageInputs, between) -> tuple[nn.Module, dict]:
        tolerance = settings.budget.tolerance
        steps, round_to = args.tp_steps, args.tp_round_to
        shape = inputs.input_shape
        return torch_pruning_to_budget(base, budget, shape, tolerance, steps, round_to, between)

    measurements, extra = finetuned_and_measured(settings, prune, args.tp_steps)
    extra["met"] = measurements["pruned"]["macs"] / measurements["baseline"]["macs"] <= budget
    return row_from(measurements, **extra, search="benchmark")


def control_row(args, seed: int, checkpoint: Path) -> dict:
    settings = settings_for(args, seed, "default", [f"baseline.checkpoint={checkpoint}"])

    def unpruned(base: nn.Module, inputs: StageInputs, between) -> tuple[nn.Module, dict]:
        return copy.deepcopy(base), {"sparsity": 0.0, "evaluations": 0}

    measurements, extra = finetuned_and_measured(settings, unpruned)
    return row_from(measurements, **extra, met=True, search="none")


def finetuned_and_measured(settings: RunSettings, prune, steps: int = 1) -> tuple[dict, dict]:
    """pipeline.run's flow with `prune(baseline, inputs, between) -> (model, info)` as stages
    2-3 in `steps` steps: the same seeding per stage, the same fine-tuning (between the steps
    too: `between(index, model)` fine-tunes in place for finetune.between_steps epochs) and the
    same paired measurement."""
    seed_everything(settings.seed)
    device = resolve_device(settings.device.value)
    baseline_inputs = stage_inputs(settings, settings.baseline.batch_size, device)
    finetune_inputs = stage_inputs(settings, settings.finetune.batch_size, device)
    test_loader = finetune_inputs.loaders.test
    seed_stage(settings.seed, "baseline")
    base = load_baseline(settings, baseline_inputs, None).model
    baseline_quality = quality(base, test_loader, baseline_inputs)
    seed_stage(settings.seed, "prune")
    cpu_inputs = stage_inputs(settings, settings.pruner.batch_size, torch.device("cpu"))
    between_epochs, final_epochs = split_epochs(settings.finetune, steps)
    step_settings = dataclasses.replace(settings.finetune, epochs=between_epochs)
    between_seconds = []

    def between(index: int, model: nn.Module) -> None:
        seed_stage(settings.seed, f"finetune/step{index}")
        began = time.perf_counter()
        finetune(model, finetune_inputs, step_settings, teacher=base)
        between_seconds.append(time.perf_counter() - began)

    model, extra = prune(base, cpu_inputs, between if between_epochs else None)
    seed_stage(settings.seed, "finetune")
    began = time.perf_counter()
    final = dataclasses.replace(settings.finetune, epochs=final_epochs)
    tuned = finetune(model.to(device), finetune_inputs, final, teacher=base)
    extra["finetune_seconds"] = time.perf_counter() - began + sum(between_seconds)
    seed_stage(settings.seed, "measure")
    measurements = measure(
        base,
        baseline_quality,
        tuned.model,
        test_loader,
        finetune_inputs,
        settings.measure,
        seed=settings.seed,
    )
    return measurements, extra


def provenance(checkpoint: Path) -> dict:
    """Where rows are computed: the baseline file they start from, the CPU, torch, and how the
    budget search works. Rows from another machine or another baseline (the same cache key,
    trained elsewhere) differ in their float rounding (at MACs 0.25 the default lost 1.29
    points on one CPU, 1.77 on another) and in their latencies; another search lands on
    other sparsities under the same settings: one table must not mix them."""
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    return {
        "baseline_sha256": digest,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "budget_search": SEARCH_METHOD,
    }


def cached_row(path: Path, compute, origin: dict) -> dict:
    """The row stored at `path`, or computed now and stored (an interrupted benchmark resumes).
    A stored row with another `origin` (provenance), or none, is computed again."""
    if path.is_file():
        row = json.loads(path.read_text())
        stored = row.get("provenance") or {}
        if stored == origin:
            return row | {"cached": True}
        changed = ", ".join(key for key in origin if stored.get(key) != origin[key])
        print(f"# {path.name}: computed with another {changed}: computing again", file=sys.stderr)
    began = time.perf_counter()
    row = compute()
    row["provenance"] = origin
    # Stored with the row, so that a benchmark resumed from cached rows still states its cost.
    row["seconds"] = time.perf_counter() - began
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(row, indent=2))
    staging.replace(path)
    return row


def all_rows(args: argparse.Namespace, checkpoint: Path, origin: dict) -> list[dict]:
    rows_root = args.output_root / "rows"
    folders = {name: rows_root / recipe_key(args, name) for name in [*args.recipes, CONTROL]}
    rows = []
    for seed in args.seeds:
        for budget in args.budgets:
            for recipe in args.recipes:
                name = f"{recipe}-b{budget:g}-s{seed}"
                folder = folders[recipe]

                def compute(recipe=recipe, budget=budget, seed=seed, where=folder / name) -> dict:
                    if recipe == "torch_pruning":
                        return torch_pruning_row(args, budget, seed, checkpoint)
                    return pipeline_row(args, recipe, budget, seed, checkpoint, where)

                row = cached_row(folder / f"{name}.json", compute, origin)
                rows.append(row | {"recipe": recipe, "budget": budget, "seed": seed})
                print(f"# done: {name}", file=sys.stderr, flush=True)
        if args.no_control:
            continue
        row = cached_row(
            folders[CONTROL] / f"{CONTROL}-s{seed}.json",
            lambda seed=seed: control_row(args, seed, checkpoint),
            {key: value for key, value in origin.items() if key != "budget_search"},  # no search
        )
        rows.append(row | {"recipe": CONTROL, "budget": None, "seed": seed})
        print(f"# done: {CONTROL}-s{seed}", file=sys.stderr, flush=True)
    return rows


# --- aggregates, table, summary, plot --------------------------------------------------------


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (budget, recipe): mean, min, max and std over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["budget"], row["recipe"]), []).append(row)
    out = []
    for (budget, recipe), group in groups.items():
        entry = {"budget": budget, "recipe": recipe, "seeds": [r["seed"] for r in group]}
        for key in ("accuracy", "points_lost", "macs_ratio", "params_ratio", "latency_ratio"):
            entry[key] = spread([r[key] for r in group])
        entry["met"] = all(r["met"] for r in group)
        entry["change"] = [[r["change_points"], *r["change_ci"]] for r in group]
        out.append(entry)
    return out


HEADER = (
    f"{'MACs':>5} {'recipe':>13} {'n':>2} {'accuracy':>8} {'(min-max)':>15} {'lost pts':>8} "
    f"{'(min..max)':>14} {'MACs':>6} {'params':>6} {'latency':>7} {'met':>3}  "
    "paired change, points [95 % CI], per seed"
)


def format_entry(entry: dict) -> str:
    acc, lost = entry["accuracy"], entry["points_lost"]
    budget = "none" if entry["budget"] is None else f"{entry['budget']:g}"
    changes = " ".join(f"{p:+.2f}[{lo:+.2f},{hi:+.2f}]" for p, lo, hi in entry["change"])
    return (
        f"{budget:>5} {entry['recipe']:>13} {len(entry['seeds']):>2} {acc['mean']:>8.4f} "
        f"({acc['min']:.4f}-{acc['max']:.4f}) {lost['mean']:>8.2f} "
        f"({lost['min']:>5.2f}..{lost['max']:>5.2f}) {entry['macs_ratio']['mean']:>6.3f} "
        f"{entry['params_ratio']['mean']:>6.3f} {entry['latency_ratio']['mean']:>7.3f} "
        f"{'yes' if entry['met'] else 'NO':>3}  {changes}"
    )


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def seed_gaps(default: dict, other: dict) -> list[float]:
    """Per seed, the default's accuracy minus `other`'s, in points (both rows of a seed prune
    the same baseline and are tested on the same images: the seed pairs them)."""
    changes = dict(zip(other["seeds"], other["change"], strict=True))
    return [
        change[0] - changes[seed][0]
        for seed, change in zip(default["seeds"], default["change"], strict=True)
        if seed in changes
    ]


def summary(entries: list[dict]) -> str:
    by = {(e["budget"], e["recipe"]): e for e in entries}

    def lost(budget: float, recipe: str) -> float | None:
        entry = by.get((budget, recipe))
        return None if entry is None else entry["points_lost"]["mean"]

    parts = []
    default_half = lost(0.5, "default")
    parts.append(
        "MACs 0.5: default loses n/a (not run)"
        if default_half is None
        else f"MACs 0.5: default loses {default_half:.2f} pts (target <= {DEFAULT_LOSS_TARGET}: "
        f"{verdict(default_half <= DEFAULT_LOSS_TARGET)})"
    )
    for budget in LOSS_SHARE_BUDGETS:
        default, reference = lost(budget, "default"), lost(budget, "reference")
        if default is None or reference is None:
            parts.append(f"MACs {budget:g}: default/reference loss n/a (not run)")
            continue
        # A reference that loses nothing leaves nothing to divide by: report the points.
        if reference > 0:
            share = max(default, 0.0) / reference
            shown = f"{share:.3f}"
            met = verdict(share <= LOSS_SHARE_TARGET)
        else:
            shown, met = "n/a", verdict(default <= 0)
        parts.append(
            f"MACs {budget:g}: default/reference loss {shown} ({default:.2f}/{reference:.2f} "
            f"pts; target <= {LOSS_SHARE_TARGET:.3f}: {met})"
        )
    gaps = []
    for budget in sorted({e["budget"] for e in entries if e["budget"] is not None}, reverse=True):
        default, tp = by.get((budget, "default")), by.get((budget, "torch_pruning"))
        if default and tp:
            gap = 100.0 * (default["accuracy"]["mean"] - tp["accuracy"]["mean"])
            per_seed = seed_gaps(default, tp)
            agree = (
                "ahead at every seed"
                if all(g > 0 for g in per_seed)
                else "behind at every seed"
                if all(g < 0 for g in per_seed)
                else "seeds disagree"
            )
            shown = "/".join(f"{g:+.2f}" for g in per_seed)
            gaps.append(f"{budget:g}: {gap:+.2f} (seeds {shown}: {agree})")
    if gaps:
        parts.append(f"default - torch_pruning accuracy, pts: {', '.join(gaps)} (target > 0)")
    return "summary: " + "; ".join(parts)


# Printed under the summary: what no interval in the table covers.
ONE_BASELINE = (
    "note: every seed prunes the same baseline, so neither the intervals nor the seed spread "
    "include the variance of training the baseline again; a difference between recipes that "
    "another baseline could reverse is a claim only once it holds again with other --seeds "
    "(the first seed trains the baseline and draws the split)"
)


def control_line(entries: list[dict], baseline_info: dict) -> str:
    control = next((e for e in entries if e["recipe"] == CONTROL), None)
    convergence = baseline_info["convergence"]
    verdict = (
        "unknown"
        if convergence is None
        else ("converged" if convergence["converged"] else "NOT converged")
        + f" ({convergence['reason']})"
    )
    line = f"baseline convergence check: {verdict}"
    if control is not None:
        gain = 0.0 - control["points_lost"]["mean"]  # 0.0 - 0.0, never "-0.00"
        line += f"; control (fine-tuning alone, unpruned): {gain:+.2f} pts"
        if gain > CONTROL_GAIN_LIMIT:
            line += (
                f" > {CONTROL_GAIN_LIMIT}: the baseline is not converged; part of every "
                "recipe's accuracy is extra training"
            )
        elif gain < -CONTROL_GAIN_LIMIT:
            line += (
                f" < -{CONTROL_GAIN_LIMIT}: the fine-tuning itself costs the unpruned model "
                "accuracy; part of every recipe's loss is the fine-tuning's, not the pruning's"
            )
    return line


def plot(entries: list[dict], baseline_accuracy: float, path: Path) -> Path:
    """Accuracy against MACs ratio (left) and CPU latency ratio (right), mean and min-max over
    seeds, one line per recipe; the control at ratio 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for recipe in [*RECIPES, CONTROL]:
        points = sorted(
            (e for e in entries if e["recipe"] == recipe), key=lambda e: e["macs_ratio"]["mean"]
        )
        if not points:
            continue
        for axis, key in zip(axes, ("macs_ratio", "latency_ratio"), strict=True):
            x = [e[key]["mean"] for e in points]
            y = [e["accuracy"]["mean"] for e in points]
            yerr = [
                [e["accuracy"]["mean"] - e["accuracy"]["min"] for e in points],
                [e["accuracy"]["max"] - e["accuracy"]["mean"] for e in points],
            ]
            xerr = [
                [e[key]["mean"] - e[key]["min"] for e in points],
                [e[key]["max"] - e[key]["mean"] for e in points],
            ]
            axis.errorbar(
                x,
                y,
                yerr=yerr,
                xerr=xerr,
                marker="o",
                capsize=3,
                label=recipe,
                linestyle="none" if recipe == CONTROL else "-",
            )
    labels = ("MACs ratio (pruned / baseline)", "CPU latency ratio (pruned / baseline)")
    for axis, label in zip(axes, labels, strict=True):
        axis.axhline(baseline_accuracy, color="grey", linestyle=":", label="baseline")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy after fine-tuning")
    axes[0].legend()
    figure.suptitle("Recipes at equal MACs budgets (mean, min-max over seeds)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def cost_line(rows: list[dict], wall: float, trained_now: float | None) -> str:
    """What the benchmark costs with the baseline cached: this run's wall time (less the
    baseline's training, `trained_now`, where it trained) plus what the rows it found cached
    took when they were computed."""
    cached = [row for row in rows if row.get("cached")]
    earlier = [row["seconds"] for row in cached if "seconds" in row]
    text = f"cost with the baseline cached: {len(rows) - len(cached)} rows computed now"
    if len(earlier) < len(cached):
        return text + f", {len(cached) - len(earlier)} cached rows of unknown cost"
    total = wall - (trained_now or 0.0) + sum(earlier)
    return text + f", {len(cached)} cached rows that took {sum(earlier):.0f} s: {total:.0f} s"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet_warnings()
    if "torch_pruning" in args.recipes:
        require_torch_pruning()  # before the baseline, not hours later
    began = time.perf_counter()
    info = ensure_baseline(args)
    origin = provenance(info["path"])  # hashed once: every row and the output name it
    rows = all_rows(args, info["path"], origin)
    entries = aggregate(rows)
    order = {name: index for index, name in enumerate([*RECIPES, CONTROL])}
    entries.sort(key=lambda e: (e["budget"] is None, -(e["budget"] or 0), order[e["recipe"]]))
    trained = info["train_seconds"]
    trained_text = "unknown" if trained is None else f"{trained:.0f} s"
    print(
        f"# fashion_mnist, {args.train_limit} training images, baseline {args.baseline_epochs} "
        f"epochs ({info['source']} now; training took {trained_text}), {args.finetune_epochs} "
        f"fine-tuning epochs for every recipe and the control; seeds {args.seeds} "
        f"(dataset.seed={args.seeds[0]} for all: one baseline, split and test set; the seed "
        "changes the pruning statistics batches and the fine-tuning order); ratios are "
        "pruned / baseline, means over seeds; lost pts = baseline - pruned accuracy"
    )
    print(
        f"# computed on {origin['cpu']}, torch {origin['torch']}, baseline file sha256 "
        f"{origin['baseline_sha256']}, budget search: {origin['budget_search']}"
    )
    print(HEADER)
    for entry in entries:
        print(format_entry(entry))
    print(control_line(entries, info))
    print(f"pareto plot: {plot(entries, rows[0]['baseline_accuracy'], args.plot)}")
    wall = time.perf_counter() - began
    print(f"wall time {wall:.0f} s (rows cached under {args.output_root / 'rows'} are reused)")
    print(cost_line(rows, wall, trained if info["source"] == "trained" else None))
    print(summary(entries))
    print(ONE_BASELINE)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": vars(args), "baseline": info, "rows": rows, "aggregates": entries}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
