"""The models a report compares: each run's pruned model, and the baseline they were pruned from
once (a sweep's jobs share one), with labels a reader can tell apart and the accuracy/cost
frontier."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from pipeline.report.sources import RunRecord

# Config keys that never tell two models apart.
IGNORED_KEYS = ("paths.", "tracking.", "device", "num_workers")


@dataclass
class Model:
    label: str
    figures: dict  # the run's "baseline" or "pruned" measurements
    runs: list[RunRecord] = field(default_factory=list)  # the baseline: every run that shares it
    baseline: Model | None = None  # a pruned model's own baseline; None for a baseline

    @property
    def is_baseline(self) -> bool:
        return self.baseline is None

    @property
    def side(self) -> str:
        return "baseline" if self.is_baseline else "pruned"

    @property
    def record(self) -> dict:
        """The measurements.json of the (first) run that measured this model."""
        return self.runs[0].record

    @property
    def latency_p50(self) -> float:
        """Milliseconds; a baseline timed by several runs: the median of their medians."""
        if self.is_baseline:
            return statistics.median(r.record["baseline"]["latency_ms"]["p50"] for r in self.runs)
        return self.figures["latency_ms"]["p50"]

    @property
    def throughput(self) -> float:
        if self.is_baseline:
            return statistics.median(r.record["baseline"]["throughput"] for r in self.runs)
        return self.figures["throughput"]

    @property
    def per_class(self) -> dict | None:
        """{"correct", "predicted", "confusion"} of this model, or None (an older run)."""
        classes = self.record.get("per_class")
        return classes[self.side] | {"support": classes["support"]} if classes else None

    @property
    def resources(self) -> dict | None:
        """Its resource series while it ran inference alone, or None (an older run)."""
        windows = self.record.get("inference_resources")
        return windows.get(self.side) if windows else None


def compared_models(runs: list[RunRecord]) -> list[Model]:
    """Baselines first (each once), then one pruned model per run, in the runs' order."""
    baselines: dict[str, Model] = {}
    pruned: list[Model] = []
    for run in runs:
        key = _baseline_key(run.record)
        if key not in baselines:
            baselines[key] = Model("baseline", run.record["baseline"])
        baseline = baselines[key]
        baseline.runs.append(run)
        pruned.append(Model(_label(run), run.record["pruned"], [run], baseline))
    if len(baselines) > 1:
        for index, model in enumerate(baselines.values(), start=1):
            model.label = f"baseline {index}"
    _disambiguate(pruned)
    return [*baselines.values(), *pruned]


def _baseline_key(record: dict) -> str:
    """Runs share a baseline when it is the same model, trained the same way, scored the same."""
    config = record.get("config", {})
    base = record["baseline"]
    return json.dumps(
        [
            config.get("model"),
            config.get("dataset"),
            config.get("seed"),
            config.get("baseline"),
            config.get("max_batches"),
            base["params"],
            round(base["accuracy"], 9),
            base.get("test_samples"),
        ],
        sort_keys=True,
        default=str,
    )


def pruner_name(run: RunRecord) -> str:
    """The pruner's config-group choice where the source knows it, else its class name."""
    if run.pruner:
        return run.pruner
    target = run.record.get("config", {}).get("pruner", {}).get("_target_", "?")
    return target.rsplit(".", 1)[-1].removeprefix("Activation").removesuffix("Pruner")


ENGINE_NAMES = {"nni": "NNI", "torch_pruning": "Torch-Pruning"}
# Class-name parts that say what a class is, not which criterion it ranks by.
SUFFIXES, PREFIXES = ("Pruner", "Importance"), ("Activation", "Group")


def engine_name(record: dict) -> str:
    """The engine that pruned a run; runs recorded before the engine was a choice were NNI's."""
    engine = (record.get("pruning") or {}).get("engine")
    if engine is None:
        target = record.get("config", {}).get("pruner", {}).get("_target_", "")
        engine = "torch_pruning" if target.startswith("torch_pruning.") else "nni"
    return ENGINE_NAMES.get(engine, engine)


def criterion(record: dict) -> str:
    """What the pruner ranks channels by, with the options that change the ranking: the
    criterion class's name ("MeanRank", "L1Norm", "Magnitude p=2", "LAMP p=2"), and "global"
    where channels compete across layers."""
    pruner = record.get("config", {}).get("pruner", {})
    name = pruner.get("_target_", "?").rsplit(".", 1)[-1]
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    for prefix in PREFIXES:
        name = name.removeprefix(prefix) or name  # TP's ActivationImportance stays "Activation"
    parts = [name]
    if pruner.get("activation"):  # the function NNI's activation pruners rank the outputs of
        parts.append(f"of {pruner['activation']}")
    parts += [f"{key}={value}" for key, value in sorted((pruner.get("importance") or {}).items())]
    if pruner.get("global_pruning"):
        parts.append("global")
    return " ".join(parts)


def sparsity_text(record: dict) -> str:
    config = record.get("config", {})
    if config.get("pruner", {}).get("config_list"):
        return "config list"
    budget = (record.get("pruning") or {}).get("budget")
    if budget is not None:  # the sparsity the run found for it
        return f"{budget['sparsity']:.3g} ({budget['kind']} {budget['target']:g})"
    sparsity = config.get("sparsity")
    return f"{sparsity:g}" if isinstance(sparsity, (int, float)) else "?"


def _label(run: RunRecord) -> str:
    return f"{pruner_name(run)} s={sparsity_text(run.record)}"


def _disambiguate(models: list[Model]) -> None:
    """Models that would share a label get the config values that tell them apart."""
    groups: dict[str, list[Model]] = defaultdict(list)
    for model in models:
        groups[model.label].append(model)
    for label, group in groups.items():
        if len(group) < 2:
            continue
        configs = [_flat(model.record.get("config", {})) for model in group]
        keys = sorted(
            key
            for key in set().union(*configs)
            if not key.startswith(IGNORED_KEYS) and len({c.get(key) for c in configs}) > 1
        )
        for index, (model, config) in enumerate(zip(group, configs, strict=True), start=1):
            shown = ", ".join(f"{key}={config.get(key)}" for key in keys[:2])
            model.label = f"{label} ({shown})" if shown else f"{label} #{index}"
        if len({model.label for model in group}) < len(group):
            for index, model in enumerate(group, start=1):
                model.label = f"{model.label} #{index}"


def _flat(tree: object, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        flat: dict[str, str] = {}
        for key, value in tree.items():
            flat |= _flat(value, f"{prefix}{key}.")
        return flat
    return {prefix.rstrip("."): json.dumps(tree, default=str)}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points: whether each is on the frontier, i.e. no other point costs
    no more and is at least as accurate while being better in one of the two."""

    def dominated(cost: float, accuracy: float) -> bool:
        return any(
            other_cost <= cost
            and other_accuracy >= accuracy
            and (other_cost < cost or other_accuracy > accuracy)
            for other_cost, other_accuracy in points
        )

    return [not dominated(cost, accuracy) for cost, accuracy in points]
