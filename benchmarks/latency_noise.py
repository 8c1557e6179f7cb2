"""Does the latency ratio hold on a busy machine?

One baseline and its pruned model (the project's default pruned model) are built once, then timed
as the measure stage times them (pipeline.stages.measure.timed_pair, alternating rounds,
and pipeline.measure.uncertainty.latency_ratio) --runs times on the idle machine and --runs
times while a separate process keeps one core busy. Three criteria say whether the ratio and
its interval survive the load.

    python benchmarks/latency_noise.py
    python benchmarks/latency_noise.py --size 32 --runs 3 --threads 1 --json noise.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import _common as common
import torch

from pipeline.config.schema import MeasureSettings
from pipeline.models.stats import count_macs, count_params

# (a): the loaded median ratio may differ from the idle one by this fraction.
TOLERANCE = 0.10
# (c): below this idle ratio the pruned model is clearly faster, so no run may call it slower.
CLEARLY_FASTER = 0.9
# The busy process ends by itself after this many times the idle phase (plus a minute), should
# this script die before it can stop it.
BUSY_SAFETY_FACTOR = 5


@dataclass
class Run:
    condition: str  # "idle" or "loaded"
    number: int
    baseline: dict  # LatencyStats.as_dict()
    pruned: dict
    ratio: dict  # pipeline.measure.uncertainty.latency_ratio
    load_average: float  # 1-minute load average right after the run
    busy_alive: bool | None = None  # loaded runs: the busy process still ran at the end


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, choices=sorted(common.NUM_CLASSES))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=5, help="timings per condition")
    common.add_timing_options(parser)
    parser.add_argument("--json", type=Path, default=None, help="write the raw runs here")
    return parser.parse_args(argv)


def busy_process(seconds: float) -> subprocess.Popen:
    """A Python process that keeps one core busy for at most `seconds`."""
    loop = f"import time\nend = time.time() + {seconds:.0f}\nwhile time.time() < end: pass"
    return subprocess.Popen([sys.executable, "-c", loop])


def timed_runs(
    condition: str,
    runs: int,
    baseline: torch.nn.Module,
    pruned: torch.nn.Module,
    size: int,
    settings: MeasureSettings,
    busy: subprocess.Popen | None = None,
) -> list[Run]:
    done = []
    for number in range(1, runs + 1):
        pair, ratio, _ = common.timed_ratio(baseline, pruned, size, torch.device("cpu"), settings)
        alive = None if busy is None else busy.poll() is None
        done.append(
            Run(
                condition,
                number,
                pair.baseline.as_dict(),
                pair.pruned.as_dict(),
                ratio,
                os.getloadavg()[0],
                alive,
            )
        )
        print(format_run(done[-1]), flush=True)
        if alive is False:
            print("# the busy process had already ended: this run was not loaded throughout")
    return done


HEADER = (
    f"{'condition':>9} {'run':>3} {'base p50':>9} {'pruned p50':>10} {'ratio':>7} "
    f"{'ci low':>7} {'ci high':>7} {'load':>5}"
)


def format_run(run: Run) -> str:
    return (
        f"{run.condition:>9} {run.number:>3} {run.baseline['p50']:>9.2f} "
        f"{run.pruned['p50']:>10.2f} {run.ratio['ratio']:>7.3f} {run.ratio['ci_low']:>7.3f} "
        f"{run.ratio['ci_high']:>7.3f} {run.load_average:>5.2f}"
    )


def criteria(idle: list[Run], loaded: list[Run]) -> dict[str, dict]:
    """The three checks, each with its verdict and the figures behind it."""
    idle_median = statistics.median(run.ratio["ratio"] for run in idle)
    loaded_median = statistics.median(run.ratio["ratio"] for run in loaded)
    shift = loaded_median / idle_median - 1.0
    inside = sum(run.ratio["ci_low"] <= idle_median <= run.ratio["ci_high"] for run in loaded)
    needed = len(loaded) - 1
    slower = sum(run.ratio["ci_low"] > 1.0 for run in idle + loaded)
    applies = idle_median < CLEARLY_FASTER
    return {
        "a": {
            "passed": abs(shift) <= TOLERANCE,
            "text": f"loaded median ratio {loaded_median:.3f} within {TOLERANCE:.0%} of the idle "
            f"median {idle_median:.3f} ({shift:+.1%})",
            "idle_median": idle_median,
            "loaded_median": loaded_median,
            "shift": shift,
        },
        "b": {
            "passed": inside >= needed,
            "text": f"idle median inside the interval of {inside}/{len(loaded)} loaded runs "
            f"(at least {needed} needed)",
            "inside": inside,
            "needed": needed,
        },
        "c": {
            "passed": not applies or slower == 0,
            "text": f"{slower}/{len(idle) + len(loaded)} runs report the pruned model measurably "
            f"slower (interval above 1)"
            + (
                ""
                if applies
                else f"; not tested: the idle median {idle_median:.3f} is not below "
                f"{CLEARLY_FASTER}"
            ),
            "measurably_slower": slower,
            "applies": applies,
        },
    }


def summary(size: int, sparsity: float, checks: dict[str, dict]) -> str:
    a, b, c = checks["a"], checks["b"], checks["c"]
    verdicts = "/".join("pass" if check["passed"] else "fail" for check in checks.values())
    return (
        f"summary: {size}x{size} s={sparsity:g}: idle median ratio {a['idle_median']:.3f}, "
        f"loaded {a['loaded_median']:.3f} ({a['shift']:+.1%}); idle median inside "
        f"{b['inside']} loaded intervals; {c['measurably_slower']} runs measurably slower; "
        f"criteria a/b/c: {verdicts}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet_warnings()
    measure = common.measure_settings(
        threads=args.threads, warmup=args.warmup, repeats=args.repeats, rounds=args.rounds
    )
    shape = common.input_shape(args.size)
    baseline = common.build_model(args.size).eval()
    began = time.perf_counter()
    pruned = common.project_pruned_model(
        baseline, args.size, args.sparsity, common.pruner_settings()
    ).eval()
    threads = torch.get_num_threads() if measure.threads is None else measure.threads
    print(
        f"# {args.size}x{args.size} s={args.sparsity:g}: pruned in "
        f"{time.perf_counter() - began:.1f} s; params ratio "
        f"{count_params(pruned) / count_params(baseline):.3f}, MACs ratio "
        f"{count_macs(pruned, shape) / count_macs(baseline, shape):.3f}",
        file=sys.stderr,
    )
    print(
        f"# batch 1 cpu, threads {threads}, warmup {measure.warmup}, {measure.repeats} calls per "
        f"model in {measure.rounds} alternating rounds; ratios are pruned / baseline with 95 % "
        f"intervals, times in ms per call; load average {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    print(HEADER, flush=True)
    began = time.perf_counter()
    idle = timed_runs("idle", args.runs, baseline, pruned, args.size, measure)
    safety_s = 60 + BUSY_SAFETY_FACTOR * (time.perf_counter() - began)
    busy = busy_process(safety_s)
    try:
        time.sleep(1.0)  # let the busy loop start before the first timed call
        loaded = timed_runs("loaded", args.runs, baseline, pruned, args.size, measure, busy)
    finally:
        busy.kill()
        busy.wait()
    checks = criteria(idle, loaded)
    for name, check in checks.items():
        print(f"criterion ({name}) {check['text']}: {'pass' if check['passed'] else 'fail'}")
    print(summary(args.size, args.sparsity, checks))
    if args.json is not None:
        report = {
            "args": vars(args),
            "measure": asdict(measure),
            "runs": [asdict(run) for run in idle + loaded],
            "criteria": checks,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
