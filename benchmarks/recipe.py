"""Recipe benchmark: the reference recipe against the project's default, same baseline and budget.

    python benchmarks/recipe.py [--sparsities 0.15 0.5 0.7] [--train-limit 8000]
                                [--baseline-epochs 6] [--finetune-epochs 3]

On Fashion-MNIST (Debian's dataset-fashion-mnist), one baseline is trained (and cached), then
pruned at each sparsity twice:
- reference: one-shot pruning as NNI does it (pruner.iterations=1; its own channel counts,
  pruner.round_to=null; its own activation statistics, pruner.statistics=nni; no BatchNorm
  re-estimation) and the reference fine-tuning recipe (finetune=reference: Adam, constant rate,
  cross-entropy);
- default: the project's defaults (pruning in 4 steps with BatchNorm statistics re-estimated
  after each, rounded channel counts, statistics of the real activations, Adam under a cosine
  schedule).
Both get the same number of fine-tuning epochs. The table gives accuracy after fine-tuning,
the accuracy points lost against the shared baseline, and params / MACs / latency ratios; the
summary line gives, at sparsity 0.5, the default's loss as a fraction of the reference's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _common as common

from pipeline.run import run

RECIPES = {
    "reference": [
        "finetune=reference",
        "pruner.round_to=null",
        "pruner.statistics=nni",
        "pruner.iterations=1",
        "pruner.recalibration_batches=0",
    ],
    "default": [],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.15, 0.5, 0.7])
    parser.add_argument("--train-limit", type=int, default=8000)
    parser.add_argument("--baseline-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--output-root", type=Path, default=Path("outputs/benchmarks/recipe"))
    parser.add_argument("--json", type=Path, default=None, help="write the raw rows here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    return parser.parse_args(argv)


def run_one(args: argparse.Namespace, sparsity: float, recipe: str) -> dict:
    overrides = [
        "dataset=fashion_mnist",
        f"dataset.train_limit={args.train_limit}",
        f"baseline.epochs={args.baseline_epochs}",
        f"finetune.epochs={args.finetune_epochs}",
        f"sparsity={sparsity}",
        "tracking=none",
        "measure.repeats=20",
        f"paths.output_root={args.output_root}",
        *RECIPES[recipe],
        *args.overrides,
    ]
    run_dir = args.output_root / "runs" / f"{recipe}-{sparsity:g}"
    record = run(common.project_settings(overrides), run_dir)
    base, pruned = record["baseline"], record["pruned"]
    return {
        "sparsity": sparsity,
        "recipe": recipe,
        "baseline_accuracy": base["accuracy"],
        "accuracy": pruned["accuracy"],
        "drop_points": 100.0 * (base["accuracy"] - pruned["accuracy"]),
        "params_ratio": pruned["params"] / base["params"],
        "macs_ratio": pruned["macs"] / base["macs"],
        "latency_ratio": pruned["latency_ms"]["p50"] / base["latency_ms"]["p50"],
        "finetune_seconds": record["stages"]["finetune"]["seconds"],
    }


HEADER = (
    f"{'sparsity':>8} {'recipe':>9} {'base acc':>8} {'accuracy':>8} {'drop pts':>8} "
    f"{'params':>7} {'MACs':>7} {'latency':>7} {'ft s':>6}"
)


def format_row(row: dict) -> str:
    return (
        f"{row['sparsity']:>8g} {row['recipe']:>9} {row['baseline_accuracy']:>8.4f} "
        f"{row['accuracy']:>8.4f} {row['drop_points']:>8.2f} {row['params_ratio']:>7.3f} "
        f"{row['macs_ratio']:>7.3f} {row['latency_ratio']:>7.3f} {row['finetune_seconds']:>6.0f}"
    )


def summary(rows: list[dict]) -> str:
    """At the sparsity nearest 0.5: the default recipe's accuracy loss over the reference's."""
    target = min({row["sparsity"] for row in rows}, key=lambda s: abs(s - 0.5))
    drops = {row["recipe"]: row["drop_points"] for row in rows if row["sparsity"] == target}
    reference, default = drops["reference"], drops["default"]
    # A recipe that loses nothing (or gains) has nothing to divide by: report the points.
    share = f"{max(default, 0.0) / reference:.3f}" if reference > 0 else "n/a"
    return (
        f"summary: s={target:g}: points lost reference {reference:.2f}, default {default:.2f}; "
        f"default/reference loss ratio {share} (target <= 0.2)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet_warnings()
    rows = []
    for sparsity in args.sparsities:
        for recipe in RECIPES:
            rows.append(run_one(args, sparsity, recipe))
            print(f"# done: {recipe} at {sparsity:g}", file=sys.stderr, flush=True)
    print(
        f"# fashion_mnist, {args.train_limit} training images, baseline {args.baseline_epochs} "
        f"epochs, {args.finetune_epochs} fine-tuning epochs for both recipes; ratios are "
        f"pruned / baseline"
    )
    print(HEADER)
    for row in rows:
        print(format_row(row))
    print(summary(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
