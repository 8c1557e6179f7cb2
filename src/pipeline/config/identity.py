"""One hash for settings: equal settings, equal key. It names a job (config_identity: resume
finds the same job's earlier run by it) and a cached baseline (pipeline.models.baseline_cache)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config.schema import RunSettings, plain, settings_fields


def settings_hash(value: Any) -> str:
    """A stable hash of JSON-ready settings (keys sorted; anything else as its str)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Settings that change where or how a run is recorded, not what it measures.
NOT_IDENTITY = ("force", "tracking", "paths", "num_workers", "search")
# Trainer options that change how processes talk, not what they compute.
TRAINER_NOT_IDENTITY = ("backend", "timeout_s")


def identity_settings(settings: RunSettings) -> dict:
    """plain(settings) less every option left at its neutral value (schema.ranged's default):
    a run before the option existed and a run that leaves it alone are the same run."""
    return _without_neutral(RunSettings, plain(settings))


def _without_neutral(node: type, values: dict) -> dict:
    kept = {}
    for item, inner in settings_fields(node):
        value = values[item.name]
        if "neutral" in item.metadata and value == item.metadata["neutral"]:
            continue
        if inner is not None and isinstance(value, dict):
            value = _without_neutral(inner, value)
            if not value and all("neutral" in f.metadata for f, _ in settings_fields(inner)):
                continue  # a group of options all left neutral: as if it did not exist
        kept[item.name] = value
    return kept


def config_identity(settings: RunSettings) -> str:
    """A hash of the resolved settings that decide a run's results: equal hash, same job."""
    chosen = identity_settings(settings)
    if "trainer" in chosen:
        trainer = {k: v for k, v in chosen["trainer"].items() if k not in TRAINER_NOT_IDENTITY}
        chosen = {k: v for k, v in chosen.items() if k != "trainer"}
        if trainer:
            chosen["trainer"] = trainer
    return settings_hash({k: v for k, v in chosen.items() if k not in NOT_IDENTITY})
