"""Send what runs kept while their tracking server did not answer (pipeline.tracking.outbox):

    python -m pipeline.sync outputs/runs/2026-12-06/10-00-00 [more run folders]
    python -m pipeline.sync --uri http://other:5000 RUN_DIR     # a server that moved

One line per folder; exit 1 while a server still does not answer."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sync", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (or sweep folders)")
    parser.add_argument("--uri", help="send to this tracking URI instead of the one recorded")
    args = parser.parse_args(argv)

    from pipeline.tracking.mlflow_tracker import limit_http_retries, quiet_mlflow
    from pipeline.tracking.outbox import OUTBOX_FILE, sync_folder

    quiet_mlflow()
    limit_http_retries()  # as a run's: seconds, not minutes, per request
    # MLflow prints each run's address when its status is set: the one line below says it all.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    waiting = False
    for given in args.run_dirs:
        folders = sorted({p.parent for p in given.glob(f"**/{OUTBOX_FILE}")}) or [given]
        for folder in folders:
            line = sync_folder(folder, args.uri)
            waiting |= "still not answering" in line
            print(line)
    return 1 if waiting else 0


if __name__ == "__main__":
    sys.exit(main())
