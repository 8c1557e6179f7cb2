"""The pruner a budget run ranks with when the command line chooses none.

`python -m pipeline budget.macs=0.35` prunes with Torch-Pruning's group magnitude under the
pipeline's own recipe (steps, rounding, BatchNorm re-estimation, fine-tuning): on validation it
kept more accuracy than NNI's mean rank at every MACs budget and seed tried (benchmarks/recipe.py
--validation-only, Fashion-MNIST, MACs 0.35 and 0.25, seeds 1234 and 1235: mean validation
accuracy 0.9070 against 0.9036; Torch-Pruning's Taylor 0.9049). Hydra cannot choose a config
group's default from a value, so the choice is added to the command line before Hydra reads
it, where it is recorded like any other override. A command line that says anything of the
pruner (pruner=mean_rank, pruner.round_to=8) or picks a preset that may (+recipe=, experiment=,
sweep=) keeps its own: `pruner=mean_rank sparsity=0.15` is the mission's flow unchanged.
"""

from __future__ import annotations

from pipeline.config.schema import budget_overrides

BUDGET_PRUNER = "tp_magnitude"
# Override keys (their first part) that choose or configure the pruner, or select a preset.
CHOOSERS = ("pruner", "recipe", "experiment", "sweep")


def budget_pruner_override(args: list[str]) -> str | None:
    """`pruner=BUDGET_PRUNER` when `args` (a command line) ask for a budget and say nothing of
    the pruner; else None."""
    given = {}
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        given[key] = value
    chosen = any(key.split(".")[0].split("@")[0] in CHOOSERS for key in given)
    return f"pruner={BUDGET_PRUNER}" if budget_overrides(given) and not chosen else None
