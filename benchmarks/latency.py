"""Does pruning make MobileNetV2 faster, and by as much as its MACs shrink?

For each input size and sparsity the unpruned baseline is pruned and sped up with the project's
own stage functions, then baseline and pruned model are timed in alternating rounds with
pipeline.stages.measure.timed_pair, the measure stage's own timing, under the composed measure
settings (the timing options below are overrides of them); the ratio and its 95 % interval come
from pipeline.uncertainty.latency_ratio, as in the measure stage.

    python benchmarks/latency.py
    python benchmarks/latency.py --sizes 32 --sparsities 0.15 0.5 --repeats 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import _common as common
import torch

from pipeline.model_stats import count_macs, count_params
from pipeline.schema import MeasureSettings

# Above this batch size a forward pass of the 224x224 model takes a large fraction of a second
# on a small CPU, so the default repeats are cut to keep the whole run within minutes.
LARGE_BATCH = 8
REPEATS, LARGE_BATCH_REPEATS = 30, 10


@dataclass
class Row:
    size: int
    sparsity: float
    batch: int
    device: str
    params_ratio: float
    macs_ratio: float
    baseline: dict
    pruned: dict
    ratio: dict  # pipeline.uncertainty.latency_ratio: ratio, ci_low, ci_high, round_ratios, ...

    @property
    def latency_ratio(self) -> float:
        return self.ratio["ratio"]

    @property
    def measurably_slower(self) -> bool:
        return self.ratio["ci_low"] > 1.0

    @property
    def no_measurable_difference(self) -> bool:
        return self.ratio["ci_low"] <= 1.0 <= self.ratio["ci_high"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.05, 0.15, 0.3, 0.5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    common.add_timing_options(
        parser,
        threads=2,
        warmup=5,
        repeats_help=f"measure.repeats: timed calls per model (default: {REPEATS}, or "
        f"{LARGE_BATCH_REPEATS} for batches above {LARGE_BATCH})",
    )
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    parser.add_argument("--training-steps", type=int, default=5)
    parser.add_argument(
        "--round-to",
        default="default",
        help='pruner.round_to: "default" (the project default), "null" (NNI\'s own counts) or N',
    )
    parser.add_argument(
        "--runtime", default=None, help="eager | jit_freeze (default: measure.runtime in conf/)"
    )
    parser.add_argument(
        "--fold-bn", default=None, choices=["true", "false"], help="default: measure.fold_bn"
    )
    parser.add_argument(
        "--channels-last",
        default=None,
        choices=["true", "false"],
        help="default: measure.channels_last",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the raw rows here")
    return parser.parse_args(argv)


def devices(names: list[str]) -> list[torch.device]:
    return [torch.device(name) for name in names if name == "cpu" or torch.cuda.is_available()]


def measure_settings(args: argparse.Namespace) -> MeasureSettings:
    """The project's measure settings with this run's timing options as overrides: threads,
    warm-up and batch-1 repeats always; rounds and the inference form where an option names
    them."""
    return common.measure_settings(
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats or REPEATS,
        rounds=args.rounds,
        runtime=args.runtime,
        fold_bn=args.fold_bn,
        channels_last=args.channels_last,
    )


def run(args: argparse.Namespace, measure: MeasureSettings) -> list[Row]:
    settings = common.pruner_settings(args.training_steps, args.round_to)
    print(
        f"# pruner.round_to {settings.round_to}, pruner.iterations {settings.iterations}; "
        f"inference form: runtime {measure.runtime.value}, "
        f"fold_bn {measure.fold_bn}, channels_last {measure.channels_last}",
        flush=True,
    )
    print(HEADER, flush=True)
    targets = devices(args.devices)
    rows: list[Row] = []
    for size in args.sizes:
        shape = common.input_shape(size)
        baseline = common.build_model(size).eval()
        base_params, base_macs = count_params(baseline), count_macs(baseline, shape)
        for sparsity in args.sparsities:
            began = time.perf_counter()
            pruned = common.project_pruned_model(baseline, size, sparsity, settings).eval()
            print(
                f"# {size}x{size} s={sparsity}: prune+speedup {time.perf_counter() - began:.1f} s",
                file=sys.stderr,
            )
            params_ratio = count_params(pruned) / base_params
            macs_ratio = count_macs(pruned, shape) / base_macs
            for batch in args.batch_sizes:
                # None: measure.repeats, which --repeats (when given) sets for every batch.
                few = batch > LARGE_BATCH and args.repeats is None
                repeats = LARGE_BATCH_REPEATS if few else None
                for device in targets:
                    # The baseline is timed again with each pruned model, in alternating
                    # rounds: load that drifts lands on both sides of a round alike.
                    pair, ratio = common.timed_ratio(
                        baseline, pruned, size, device, measure, batch_size=batch, repeats=repeats
                    )
                    rows.append(
                        Row(
                            size,
                            sparsity,
                            batch,
                            device.type,
                            params_ratio,
                            macs_ratio,
                            pair.baseline.as_dict(),
                            pair.pruned.as_dict(),
                            ratio,
                        )
                    )
                    print(format_row(rows[-1]), flush=True)
            baseline.cpu()
    return rows


HEADER = (
    f"{'size':>7} {'sparsity':>8} {'batch':>5} {'device':>6} {'params':>7} {'MACs':>7} "
    f"{'base p50':>9} {'base sd':>8} {'pruned p50':>10} {'pruned sd':>9} {'latency':>8} "
    f"{'ci low':>7} {'ci high':>7}"
)


def format_row(row: Row) -> str:
    return (
        f"{row.size:>3}x{row.size:<3} {row.sparsity:>8.2f} {row.batch:>5} {row.device:>6} "
        f"{row.params_ratio:>7.3f} {row.macs_ratio:>7.3f} "
        f"{row.baseline['p50']:>9.2f} {row.baseline['stdev']:>8.2f} "
        f"{row.pruned['p50']:>10.2f} {row.pruned['stdev']:>9.2f} {row.latency_ratio:>8.3f} "
        f"{row.ratio['ci_low']:>7.3f} {row.ratio['ci_high']:>7.3f}"
    )


def summary(rows: list[Row]) -> str:
    """One line: how much of the MAC reduction became latency reduction for the reference
    case (largest size, smallest batch, CPU, sparsity nearest 0.15), and whether any pruned
    model was measurably slower than its baseline (its whole interval above 1)."""
    if not rows:
        return "summary: no rows"
    size = max(row.size for row in rows)
    batch = min(row.batch for row in rows)
    device = "cpu" if any(row.device == "cpu" for row in rows) else rows[0].device
    candidates = [r for r in rows if r.size == size and r.batch == batch and r.device == device]
    ref = min(candidates, key=lambda r: abs(r.sparsity - 0.15))
    slower = sum(r.measurably_slower for r in rows)
    unclear = sum(r.no_measurable_difference for r in rows)
    verdict = "yes" if not slower else f"no ({slower}/{len(rows)} rows measurably slower)"
    case = f"{size}x{size} batch {batch} {device} at s={ref.sparsity:g}"
    ratios = (
        f"latency ratio {ref.latency_ratio:.3f} "
        f"[{ref.ratio['ci_low']:.3f}, {ref.ratio['ci_high']:.3f}], "
        f"MACs ratio {ref.macs_ratio:.3f}, "
        f"latency/MACs ratio {ref.latency_ratio / ref.macs_ratio:.3f}"
    )
    counts = f"pruned never slower: {verdict}; no measurable difference: {unclear}/{len(rows)} rows"
    return f"summary: {case}: {ratios}; {counts}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet_warnings()
    measure = measure_settings(args)
    print(
        f"# threads {measure.threads}, warmup {measure.warmup}, {measure.rounds} alternating "
        f"rounds, ratios are pruned / baseline with 95 % intervals, "
        f"times in ms per call; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    rows = run(args, measure)
    # Other processes on the machine distort CPU timings the most: say how busy it was.
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    print(summary(rows))
    if args.json is not None:
        records = [asdict(row) | {"latency_ratio": row.latency_ratio} for row in rows]
        report = {"args": vars(args), "measure": asdict(measure), "rows": records}
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
