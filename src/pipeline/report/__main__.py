"""`python -m pipeline.report`: compare pruned models with their baseline, as report.md and a
self-contained report.html (images inside), from MLflow runs or measurements.json files.

    python -m pipeline.report --sweep <parent run id>      # a sweep's jobs
    python -m pipeline.report --experiment pruning         # every finished run of an experiment
    python -m pipeline.report --runs <run id> <run id>     # chosen runs
    python -m pipeline.report outputs/sweeps/2026-11-25/10-00-00   # files: tracking=none too

Bad arguments print one line naming the option and what it allows, and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError

MLFLOW_SOURCES = ("--experiment", "--sweep", "--runs")


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the usage and the error on two lines; one is what a user should see."""

    def error(self, message: str):
        print(f"error: {message} (see python -m pipeline.report --help)", file=sys.stderr)
        sys.exit(2)


def parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m pipeline.report",
        description="Compare pruned models with their baseline: results table, size/speed/"
        "quality and accuracy/MACs figures, resource use during inference, per-class quality, "
        "fine-tuning and pruning curves.",
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="measurements.json files, or folders to search for them (a sweep or runs folder)",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--experiment", metavar="NAME", help="every finished run of an experiment")
    source.add_argument("--sweep", metavar="RUN_ID", help="the jobs of the sweep with this parent")
    source.add_argument("--runs", metavar="RUN_ID", nargs="+", help="these MLflow runs")
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="the MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="folder for report.md, report.html and the figures "
        "(default: outputs/reports/<date>/<time>)",
    )
    p.add_argument("--title", help="the report's title (default: model, dataset, run count)")
    return p


def check(args: argparse.Namespace) -> None:
    """The combinations argparse cannot express, each refused with one line."""
    chosen = [o for o in MLFLOW_SOURCES if getattr(args, o.lstrip("-")) is not None]
    if args.paths and chosen:
        raise SystemExit(_refuse(f"{chosen[0]}: give it or measurements.json paths, not both"))
    if not args.paths and not chosen:
        raise SystemExit(
            _refuse("give measurements.json paths or one of --experiment, --sweep, --runs")
        )
    if args.tracking_uri is not None and not chosen:
        raise SystemExit(_refuse("--tracking-uri: only with --experiment, --sweep or --runs"))
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise SystemExit(_refuse(f"--out {args.out}: a file is there; give a folder"))
    if args.title is not None and not args.title.strip():
        raise SystemExit(_refuse("--title: give a non-empty title"))


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check(args)
    out = args.out or Path("outputs/reports") / time.strftime("%Y-%m-%d/%H-%M-%S")
    try:
        return _report(args, out)
    except PipelineError as error:
        return _refuse(str(error))


def _report(args: argparse.Namespace, out: Path) -> int:
    from pipeline.report.build import build_report

    parent = None
    if args.paths:
        from pipeline.report.sources import from_paths

        runs, notes = from_paths(args.paths)
    else:
        from pipeline.report.mlflow_runs import from_mlflow
        from pipeline.tracking.store import tracking_uri

        uri = tracking_uri(args.tracking_uri, "outputs")
        runs, notes = from_mlflow(uri, args.experiment, args.sweep, args.runs)
        parents = {run.parent_run_id for run in runs}
        parent = parents.pop() if len(parents) == 1 else None
    markdown, page = build_report(runs, out, args.title, notes)
    print(f"report: {markdown}\nreport: {page}")
    if parent is not None:
        from pipeline.report.mlflow_runs import log_report

        # --sweep rebuilds the report the sweep ended with; a report on some of a sweep's runs
        # goes beside it, so that it never replaces the report on all of them.
        where = "report" if args.sweep else f"reports/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
        log_report(uri, parent, out, where)
        print(f"logged to the sweep's parent run {parent} under {where}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
