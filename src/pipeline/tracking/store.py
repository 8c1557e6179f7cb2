"""Where runs are recorded: tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite store under
the output root."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config.schema import RunSettings

# The user's own setting, read once: mlflow.set_tracking_uri() writes this variable too, so a later
# read in the same process (the next job of a sweep) would see our own earlier choice instead.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(uri: str | None, output_root: str | Path) -> str:
    """An explicit tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite store under outputs/."""
    if uri:
        return uri
    if USER_TRACKING_URI:
        return USER_TRACKING_URI
    return f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


def is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def tracking_store(settings: RunSettings) -> tuple[str, str]:
    """The setting that picks the tracking store, and the store's URI."""
    key = (
        "tracking.uri" if settings.tracking.uri or not USER_TRACKING_URI else "MLFLOW_TRACKING_URI"
    )
    return key, tracking_uri(settings.tracking.uri, settings.paths.output_root)
