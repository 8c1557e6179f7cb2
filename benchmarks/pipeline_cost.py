"""Wall time and peak memory of prune and speedup: the project's stage functions against the
plain NNI call sequence.

Every measurement runs in a fresh child process and reads that process's peak resident set size
(getrusage's ru_maxrss), so no allocator cache, import or earlier stage of one measurement leaks
into the next. The speedup child loads the masked model and masks that the prune child saved,
so its peak holds the speedup alone. This parent process never imports torch: a small parent
keeps the children's inherited RSS small.

    python benchmarks/pipeline_cost.py
    python benchmarks/pipeline_cost.py --sizes 32 --repeats 3 --json cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPLS = ("project", "plain")
STAGES = ("prune", "speedup")
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    parser.add_argument("--sparsity", type=float, default=0.15)
    parser.add_argument("--training-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="children per measurement")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the raw rows here")
    # The child side: one stage of one implementation, result written to --result.
    parser.add_argument(
        "--child", nargs=3, metavar=("STAGE", "IMPL", "SIZE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(stage: str, impl: str, size: int, args: argparse.Namespace) -> dict:
    """Run one stage in this (fresh) process and return its wall time and memory."""
    import _common as common
    import psutil
    import torch

    common.quiet_warnings()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Both children import _common (with the project's stage modules) and compose the settings,
    # so their fixed memory cost is the same; only the stage itself differs.
    # The same pruning problem on both sides, solved two ways: NNI's own channel counts and
    # statistics (which channels NNI removes decides the widths where depthwise convs are
    # pruned on their own, so other statistics would give another architecture).
    settings = common.pruner_settings(args.training_steps, round_to="null", statistics="nni")
    if impl == "default":  # the whole default schedule, for scale: all of the project's defaults
        settings = common.pruner_settings(args.training_steps)
    model = common.build_model(size)
    saved = args.workdir / f"{impl}-{size}.pt"
    if stage == "speedup":
        state = torch.load(saved, weights_only=True)
        model.load_state_dict(state["model"])
        masks = state["masks"]

    rss_before = psutil.Process().memory_info().rss
    began = time.perf_counter()
    if stage == "steps":
        model = common.project_pruned_model(model, size, args.sparsity, settings)
    elif stage == "prune" and impl == "project":
        model, masks = common.project_prune(model, size, args.sparsity, settings)
    elif stage == "prune":
        model, masks = common.plain_prune(
            model, size, args.sparsity, settings.training_steps, settings.lr
        )
    elif impl == "project":
        model = common.project_speedup(model, masks, size, settings)
    else:
        model = common.plain_speedup(model, masks, size)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    if stage == "prune":
        torch.save({"model": model.state_dict(), "masks": masks}, saved)
    record = {
        "seconds": seconds,
        "peak_bytes": peak,
        "rss_before_bytes": rss_before,
        "load_average": os.getloadavg()[0],
    }
    if stage == "speedup":
        record["architecture"] = common.architecture(model)
    if stage == "steps":
        record["iterations"] = settings.iterations
    return record


def spawn(stage: str, impl: str, size: int, args: argparse.Namespace, workdir: Path) -> dict:
    result = workdir / "result.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        stage,
        impl,
        str(size),
        "--sparsity",
        str(args.sparsity),
        "--training-steps",
        str(args.training_steps),
        *(["--threads", str(args.threads)] if args.threads is not None else []),
        "--workdir",
        str(workdir),
        "--result",
        str(result),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        raise SystemExit(f"{stage} ({impl}, {size}x{size}) failed:\n{tail}")
    record = json.loads(result.read_text())
    return {"size": size, "impl": impl, "stage": stage} | record


def measure_all(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="pipeline_cost-") as tmp:
        workdir = Path(tmp)
        for size in args.sizes:
            for repeat in range(args.repeats):
                # Alternate which side goes first so slow drift of the machine's load does not
                # always land on the same side.
                order = IMPLS if repeat % 2 == 0 else IMPLS[::-1]
                for impl in order:
                    for stage in STAGES:
                        row = spawn(stage, impl, size, args, workdir)
                        rows.append(row | {"repeat": repeat})
                        log_row(row)
                # The default pipeline prunes in pruner.iterations steps: its whole cost, for
                # scale (other statistics and widths, so not part of the like-for-like ratios).
                row = spawn("steps", "default", size, args, workdir)
                rows.append(row | {"repeat": repeat})
                log_row(row)
    return rows


def log_row(row: dict) -> None:
    print(
        f"# {row['size']}x{row['size']} {row['impl']} {row['stage']}: {row['seconds']:.1f} s, "
        f"peak {row['peak_bytes'] / MIB:.0f} MiB",
        file=sys.stderr,
        flush=True,
    )


def median(rows: list[dict], key: str, **match: object) -> float:
    picked = [row[key] for row in rows if all(row[k] == v for k, v in match.items())]
    return statistics.median(picked)


def identical(rows: list[dict], size: int) -> bool:
    """Same (name, shape) list from every speedup child of this size, both sides, all repeats."""
    shapes = [
        json.dumps(row["architecture"])
        for row in rows
        if row["stage"] == "speedup" and row["size"] == size
    ]
    return len(set(shapes)) == 1


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"# sparsity {args.sparsity}, training steps {args.training_steps}, threads "
        f"{args.threads or 'torch default'}, medians of {args.repeats} child process(es); "
        f"load average at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        "# delta = peak RSS - RSS just before the stage; ratios are project / plain",
        f"{'size':>7} {'stage':>7} {'impl':>7} {'wall s':>7} {'peak MiB':>9} {'delta MiB':>9}"
        f" {'time ratio':>10} {'peak ratio':>10}",
    ]
    for size in args.sizes:
        for stage in STAGES:
            plain_s = median(rows, "seconds", size=size, stage=stage, impl="plain")
            plain_peak = median(rows, "peak_bytes", size=size, stage=stage, impl="plain")
            for impl in IMPLS:
                seconds = median(rows, "seconds", size=size, stage=stage, impl=impl)
                peak = median(rows, "peak_bytes", size=size, stage=stage, impl=impl)
                before = median(rows, "rss_before_bytes", size=size, stage=stage, impl=impl)
                lines.append(
                    f"{size:>3}x{size:<3} {stage:>7} {impl:>7} {seconds:>7.2f} "
                    f"{peak / MIB:>9.0f} {(peak - before) / MIB:>9.0f} "
                    f"{seconds / plain_s:>10.3f} {peak / plain_peak:>10.3f}"
                )
        same = "yes" if identical(rows, size) else "NO"
        lines.append(f"# {size}x{size}: pruned architectures identical: {same}")
        steps = [row for row in rows if row["stage"] == "steps" and row["size"] == size]
        seconds = median(rows, "seconds", size=size, stage="steps", impl="default")
        plain = sum(median(rows, "seconds", size=size, stage=name, impl="plain") for name in STAGES)
        lines.append(
            f"# {size}x{size}: the default pipeline ({steps[0]['iterations']} steps of prune, "
            f"speedup and BatchNorm re-estimation) {seconds:.2f} s, peak "
            f"{median(rows, 'peak_bytes', size=size, stage='steps', impl='default') / MIB:.0f} "
            f"MiB: {seconds / plain:.3f} x the plain one-shot prune + speedup"
        )
    return "\n".join(lines)


def summary(rows: list[dict], args: argparse.Namespace) -> str:
    """Project over plain for the largest size (the 224x224 reference model by default): prune +
    speedup wall time and the highest peak RSS; architectures compared at every size."""
    size = max(args.sizes)

    def total(impl: str, stage: str | None = None) -> float:
        stages = STAGES if stage is None else (stage,)
        return sum(median(rows, "seconds", size=size, stage=name, impl=impl) for name in stages)

    def peak(impl: str, stage: str | None = None) -> float:
        stages = STAGES if stage is None else (stage,)
        return max(median(rows, "peak_bytes", size=size, stage=name, impl=impl) for name in stages)

    def ratios(measure) -> str:
        parts = ", ".join(f"{s} {measure('project', s) / measure('plain', s):.3f}" for s in STAGES)
        return f"{measure('project') / measure('plain'):.3f} ({parts})"

    same = all(identical(rows, size) for size in args.sizes)
    default = median(rows, "seconds", size=size, stage="steps", impl="default")
    return (
        f"summary: {size}x{size} prune+speedup project/plain time {ratios(total)}, "
        f"peak {ratios(peak)}; pruned architectures identical: {'yes' if same else 'no'}; "
        f"default pipeline (all its steps) / plain one-shot time {default / total('plain'):.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        stage, impl, size = args.child
        record = child(stage, impl, int(size), args)
        args.result.write_text(json.dumps(record))
        return
    rows = measure_all(args)
    print(report(rows, args))
    print(summary(rows, args))
    if args.json is not None:
        payload = {"args": vars(args), "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
