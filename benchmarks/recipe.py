"""Recipe benchmark at equal cost: every recipe pruned to the same MACs budgets, same baseline.

    python benchmarks/recipe.py [hydra overrides ...] [--budgets 0.5 0.35 0.25]
                                [--seeds 1234 1235] [--recipes reference default]
                                [--train-limit 8000] [--baseline-epochs 80]
                                [--finetune-epochs 12] [--no-control] [--validation-only]
                                [--output-root outputs/benchmarks/recipe] [--plot PNG] [--json PATH]

A recipe is a config preset, conf/recipe/<name>.yaml (`python -m pipeline +recipe=<name>` runs
it alone). On Fashion-MNIST (Debian's dataset-fashion-mnist) one baseline is trained with the
first seed and cached; dataset.seed is pinned to that seed, so every seed shares the baseline,
the split and the test set, and the seed changes only the pruning statistics batches and the
fine-tuning order. Each row is one pipeline run (pipeline.run.run) with `+recipe=<name>
budget.macs=B seed=S baseline.checkpoint=<the baseline>`: the pipeline's own budget search
finds the sparsity. Once per seed a control fine-tunes the baseline itself, unpruned, with the
same stage functions. Each row is stored as JSON under --output-root/rows, named by the config
identity of its run (pipeline.config.identity), with the seconds it took: an interrupted
benchmark resumes where it stopped, and a row whose settings changed is computed again.
The table, summary and plot: recipe_table.py.

A setting is chosen on validation data, never on the test set: with --validation-only the rows
print only what the validation split says (the best fine-tuning epoch's accuracy), e.g. to
decide a default with the default recipe and one override:
    python benchmarks/recipe.py --recipes default --budgets 0.25 --seeds 1234 --no-control \
        --validation-only pruner.activation=relu
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import _common as common
import recipe_table
import torch
from hydra.utils import instantiate

from pipeline.config.compose import group_choices
from pipeline.config.identity import config_identity
from pipeline.config.schema import RunSettings
from pipeline.files import write_json
from pipeline.models.baseline_cache import baseline_cache_path
from pipeline.models.zoo import build_from_config
from pipeline.pruning.budget import SEARCH_METHOD
from pipeline.run import resolve_device, run, stage_inputs
from pipeline.stages.baseline import baseline
from pipeline.stages.finetune import finetune
from pipeline.stages.measure import measure, quality
from pipeline.tracking.environment import cpu_model, package_version, source_hash
from pipeline.training.seeding import seed_everything, seed_stage

CONTROL = recipe_table.CONTROL


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra overrides (key=value, +key=value, ~key) apart from the options, wherever they
    stand: after `--seeds 1 2` argparse would read `max_batches=2` as a seed."""
    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    return [a for a in argv if a not in overrides], overrides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    recipes = group_choices("recipe")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    parser.add_argument("--recipes", nargs="+", choices=recipes, default=recipes)
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
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help="print each row's validation accuracy and nothing from the test set (for choosing "
        "a setting; the table reads the test set once per row)",
    )
    parser.add_argument("--output-root", type=Path, default=Path("outputs/benchmarks/recipe"))
    parser.add_argument("--plot", type=Path, default=None, help="default: <output-root>/...")
    parser.add_argument("--json", type=Path, default=None, help="write rows and aggregates here")
    options, overrides = split_argv(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(options)
    args.overrides = overrides
    if args.plot is None:
        args.plot = args.output_root / "recipe_pareto.png"
    return args


def settings_for(args: argparse.Namespace, seed: int, recipe: str, *extra: str) -> RunSettings:
    """One run's settings. dataset.seed is pinned to the first seed: one split, one test set
    and (with the baseline checkpoint) one baseline for all seeds."""
    shared = [
        "dataset=fashion_mnist",
        f"dataset.train_limit={args.train_limit}",
        f"dataset.seed={args.seeds[0]}",
        f"baseline.epochs={args.baseline_epochs}",
        f"finetune.epochs={args.finetune_epochs}",
        # Every row within 0.01 of its budget: at the project's 0.02 the quick-start
        # Torch-Pruning rows landed 0.017 under MACs 0.5 (0.483) while the others kept 0.497.
        "budget.tolerance=0.01",
        # Where a peer's steps jump over [budget - 0.01, budget], the model nearest the budget:
        # the quick-start's at MACs 0.35 jumps from 0.3503 to 0.3387, and 0.3387 was 0.006
        # below the other rows, a handicap no recipe chose.
        "budget.fallback=nearest",
        "tracking=none",
        f"paths.output_root={args.output_root}",
    ]
    overrides = [*shared, f"seed={seed}", f"+recipe={recipe}", *extra, *args.overrides]
    return common.project_settings(overrides)


def ensure_baseline(args: argparse.Namespace) -> dict:
    """Train (or find) the one baseline with the first seed, as pipeline.run would (same
    seeding, same cache entry); every row then loads it as baseline.checkpoint."""
    # The first recipe's settings: the overrides may be ones only it accepts (pruner.global_pruning
    # with a Torch-Pruning recipe); the baseline's key is the same for every recipe.
    settings = settings_for(args, args.seeds[0], args.recipes[0])
    path = baseline_cache_path(settings)
    if path is None:
        raise SystemExit("recipe.py needs baseline.cache=true and no baseline.checkpoint")
    info_path = path.with_suffix(".benchmark.json")
    seed_everything(settings.seed)
    splits, criterion = instantiate(settings.dataset), instantiate(settings.criterion)
    inputs = stage_inputs(
        settings, splits, criterion, settings.baseline.batch_size, resolve_device("auto")
    )
    seed_stage(settings.seed, "baseline")
    began = time.perf_counter()
    model = build_from_config(settings.model, trusted=[settings.model["_target_"]])
    result = baseline(model, inputs, settings.baseline, path)
    seconds = time.perf_counter() - began
    if result.source == "trained":
        info_path.write_text(json.dumps({"seconds": seconds}))
    earlier = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return {
        "path": path,
        "source": result.source,
        "train_seconds": seconds if result.source == "trained" else earlier.get("seconds"),
        "convergence": result.convergence.as_dict() if result.convergence else None,
        "val_images": len(splits.val),
    }


def row_from(record: dict, history: list[dict], **fields) -> dict:
    """The table's figures from a measure-stage result (a run record or measure()'s output)
    and the fine-tuning history: the kept model's validation accuracy (the best epoch's), by
    which a peer is chosen, and each test image's correctness, by which rows are compared."""
    base, pruned = record["baseline"], record["pruned"]
    change, latency = record["accuracy_change"], record["latency_ratio"]
    scores = [row["val_accuracy"] for row in history]
    return fields | {
        "val_accuracy": max(scores) if scores else None,
        "outcomes": record["outcomes"]["pruned"],
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


def recipe_row(settings: RunSettings, where: Path) -> dict:
    """One pipeline run; its budget search finds the sparsity."""
    record = run(settings, where)
    search = record["pruning"]["budget"]
    return row_from(
        record,
        record["finetune_history"],
        sparsity=record["pruning"]["sparsity"],
        met=bool(search["met"]),
        evaluations=len(search["evaluations"]),
        finetune_seconds=record["stages"]["finetune"]["seconds"],
    )


def control_row(settings: RunSettings) -> dict:
    """The baseline fine-tuned unpruned, by the stage functions and with the seeding of
    pipeline.run: what fine-tuning alone adds to the baseline."""
    seed_everything(settings.seed)
    device = resolve_device(settings.device.value)
    splits, criterion = instantiate(settings.dataset), instantiate(settings.criterion)
    base_inputs = stage_inputs(settings, splits, criterion, settings.baseline.batch_size, device)
    inputs = stage_inputs(settings, splits, criterion, settings.finetune.batch_size, device)
    test = inputs.loaders.test
    seed_stage(settings.seed, "baseline")
    model = build_from_config(settings.model, trusted=[settings.model["_target_"]])
    base = baseline(model, base_inputs, settings.baseline, None).model
    base_quality = quality(base, test, base_inputs)
    seed_stage(settings.seed, "finetune")
    began = time.perf_counter()
    tuned = finetune(copy.deepcopy(base), inputs, settings.finetune, teacher=base)
    seconds = time.perf_counter() - began
    seed_stage(settings.seed, "measure")
    record = measure(
        base, base_quality, tuned.model, test, inputs, settings.measure, seed=settings.seed
    )
    return row_from(
        record, tuned.history, sparsity=0.0, met=True, evaluations=0, finetune_seconds=seconds
    )


def provenance(checkpoint: Path) -> dict:
    """Where and by what rows are computed: the baseline file they start from, the CPU, torch,
    the pipeline's own code (a hash of its source and configs), the pruning libraries and how
    the budget search works. Rows from another machine or another baseline (the same cache key,
    trained elsewhere) differ in their float rounding (at MACs 0.25 the default lost 1.29
    points on one CPU, 1.77 on another) and in their latencies, and rows from other code in
    anything: one table must not mix them."""
    return {
        "baseline_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16],
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "code": source_hash(),
        "nni": package_version("nni"),
        "torch_pruning": package_version("torch-pruning"),
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
    row = compute() | {"provenance": origin}
    row["seconds"] = time.perf_counter() - began  # a resumed benchmark still states its cost
    write_json(row, path)
    return row


def all_rows(args: argparse.Namespace, checkpoint: Path, origin: dict) -> list[dict]:
    rows, root = [], args.output_root / "rows"
    fixed = f"baseline.checkpoint={checkpoint}"
    for seed in args.seeds:
        jobs = [
            (recipe, budget, settings_for(args, seed, recipe, f"budget.macs={budget}", fixed))
            for budget in args.budgets
            for recipe in args.recipes
        ]
        if not args.no_control:
            jobs.append((CONTROL, None, settings_for(args, seed, "default", fixed)))
        for recipe, budget, settings in jobs:
            name = f"{recipe}-s{seed}" if budget is None else f"{recipe}-b{budget:g}-s{seed}"
            key = f"{name}-{config_identity(settings)[:12]}"

            def compute(settings=settings, recipe=recipe, where=root / key) -> dict:
                return control_row(settings) if recipe == CONTROL else recipe_row(settings, where)

            row = cached_row(root / f"{key}.json", compute, origin)
            rows.append(row | {"recipe": recipe, "budget": budget, "seed": seed})
            print(f"# done: {name}", file=sys.stderr, flush=True)
    return rows


def validation_lines(rows: list[dict], overrides: list[str], images: int) -> list[str]:
    """One line per row with what may choose a setting: its validation accuracy (the best
    epoch's) with a 95 % normal interval over the validation images, its sparsity and MACs."""
    lines = [f"# validation only; overrides: {' '.join(overrides) or 'none'}"]
    for row in rows:
        val = row["val_accuracy"]
        half = 1.96 * (val * (1 - val) / images) ** 0.5 if val is not None else 0.0
        shown = "n/a" if val is None else f"{val:.4f} +-{half:.4f}"
        budget = "none" if row["budget"] is None else f"{row['budget']:g}"
        lines.append(
            f"{row['recipe']} MACs {budget} seed {row['seed']}: validation accuracy {shown} "
            f"over {images} images, sparsity {row['sparsity']:.4f}, MACs ratio "
            f"{row['macs_ratio']:.4f}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet_warnings()
    began = time.perf_counter()
    info = ensure_baseline(args)
    origin = provenance(info["path"])  # hashed once: every row and the output name it
    rows = all_rows(args, info["path"], origin)
    if args.validation_only:
        print("\n".join(validation_lines(rows, args.overrides, info["val_images"])))
        return
    entries = recipe_table.aggregate(rows, [*args.recipes, CONTROL])
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
        f"# computed on {origin['cpu']}, torch {origin['torch']}, pipeline source "
        f"{origin['code']}, nni {origin['nni']}, torch-pruning {origin['torch_pruning']}, "
        f"baseline file sha256 {origin['baseline_sha256']}, budget search: "
        f"{origin['budget_search']}"
    )
    print(recipe_table.HEADER)
    for entry in entries:
        print(recipe_table.format_entry(entry))
    print(recipe_table.control_line(entries, info["convergence"]))
    plot = recipe_table.plot(entries, rows[0]["baseline_accuracy"], args.plot)
    print(f"pareto plot: {plot}")
    wall = time.perf_counter() - began
    print(f"wall time {wall:.0f} s (rows cached under {args.output_root / 'rows'} are reused)")
    print(recipe_table.cost_line(rows, wall, trained if info["source"] == "trained" else None))
    for line in recipe_table.paired_lines(rows, [*args.recipes, CONTROL]):
        print(line)
    for line in recipe_table.refereed(rows):
        print(line)
    print(recipe_table.summary(entries, rows))
    print(recipe_table.ONE_BASELINE)
    if args.json is not None:
        payload = {"args": vars(args), "baseline": info, "rows": rows, "aggregates": entries}
        write_json(payload, args.json)


if __name__ == "__main__":
    main()
