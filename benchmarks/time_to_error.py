"""How long a rejected command line takes: seconds from start to the error line, and to exit.

Every row of tests/rejected_inputs.py (issue 14's table of bad inputs, and the ones handled
before it) is run as a user types it, with the default MLflow store (the FAILED run is written
after the error line is printed). Target: the error line within 5 s on 2 cores.

    python benchmarks/time_to_error.py
    python benchmarks/time_to_error.py --repeats 3 --tracking none
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from rejected_inputs import ROWS  # noqa: E402

TARGET_S = 5.0


def time_row(args: list[str]) -> tuple[float, float, int, str]:
    """(seconds to the first stderr line, seconds to exit, exit code, that line)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = process.stderr.readline().strip()
    to_line = time.perf_counter() - start
    process.stderr.read()
    process.wait()
    return to_line, time.perf_counter() - start, process.returncode, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (medians shown)")
    parser.add_argument("--tracking", choices=["mlflow", "none"], default="mlflow")
    options = parser.parse_args()

    print(f"| input | to error line (s) | to exit (s) | exit | within {TARGET_S:.0f} s |")
    print("|---|---|---|---|---|")
    slow = []
    with tempfile.TemporaryDirectory() as scratch:
        for row in ROWS:
            folder = Path(scratch) / row.id
            folder.mkdir()
            args = [*row.overrides(folder), f"paths.output_root={folder / 'outputs'}"]
            if options.tracking == "none":
                args.append("tracking=none")
            timings = [time_row(args) for _ in range(options.repeats)]
            to_line = statistics.median(t[0] for t in timings)
            to_exit = statistics.median(t[1] for t in timings)
            code = timings[-1][2]
            ok = to_line < TARGET_S and code == 2
            if not ok:
                slow.append(row.id)
            verdict = "yes" if ok else "NO"
            print(f"| {row.id} | {to_line:.2f} | {to_exit:.2f} | {code} | {verdict} |")
    within = len(ROWS) - len(slow)
    print(f"\n{within} of {len(ROWS)} rows end in the error line within {TARGET_S} s")
    if slow:
        print("over target or wrong exit code: " + ", ".join(slow))


if __name__ == "__main__":
    main()
