"""One hash for settings: equal settings, equal key. It names a job (config_identity: resume
finds the same job's earlier run by it) and a cached baseline (pipeline.models.baseline_cache)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config.schema import RunSettings, plain


def settings_hash(value: Any) -> str:
    """A stable hash of JSON-ready settings (keys sorted; anything else as its str)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Settings that change where or how a run is recorded, not what it measures.
NOT_IDENTITY = ("force", "tracking", "paths", "num_workers", "search")


def config_identity(settings: RunSettings) -> str:
    """A hash of the resolved settings that decide a run's results: equal hash, same job."""
    return settings_hash({k: v for k, v in plain(settings).items() if k not in NOT_IDENTITY})
