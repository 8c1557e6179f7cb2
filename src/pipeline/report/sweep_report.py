"""The report a multirun ends with, built from its jobs' measurements.json files, so that it is
there with tracking=none too (the MLflow parent run, when there is one, gets a copy)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def sweep_report(sweep_dir: Path) -> Path | None:
    """Build the report of the finished jobs under `sweep_dir` into `sweep_dir/report`; returns
    that folder, or None when no job finished. Never raises: the jobs' results are already
    written, and a report that cannot be built must not turn a good sweep into a failed one."""
    from pipeline.report.build import build_report
    from pipeline.report.sources import from_paths

    try:
        runs, notes = from_paths([str(sweep_dir)])
        out = sweep_dir / "report"
        markdown, page = build_report(runs, out, notes=notes)
    except Exception as error:  # see the docstring
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log.warning("no sweep report: %s: %s", type(error).__name__, first)
        log.debug("sweep report failed", exc_info=True)
        return None
    log.info("sweep report: %s and %s", markdown, page)
    return out
