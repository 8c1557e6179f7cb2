"""Does pruning make MobileNetV2 faster, and by as much as its MACs shrink?

For each input size and sparsity the unpruned baseline is pruned and sped up with the project's
own stage functions, then baseline and pruned model are timed with pipeline.latency, the same
helper the measure stage uses.

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

from pipeline.inference import inference_model
from pipeline.latency import LatencyStats, measure_latency
from pipeline.model_stats import count_macs, count_params

# Above this batch size a forward pass of the 224x224 model takes a large fraction of a second
# on a small CPU, so the default repeats are cut to keep the whole run within minutes.
LARGE_BATCH = 8


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

    @property
    def latency_ratio(self) -> float:
        return self.pruned["p50"] / self.baseline["p50"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.05, 0.15, 0.3, 0.5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads while timing")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed calls per model (default: 30, or 10 for batches above {LARGE_BATCH})",
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


def time_pair(
    baseline: torch.nn.Module,
    pruned: torch.nn.Module,
    size: int,
    batch: int,
    device: torch.device,
    args: argparse.Namespace,
) -> tuple[LatencyStats, LatencyStats]:
    repeats = args.repeats or (30 if batch <= LARGE_BATCH else 10)
    options = dict(
        device=device,
        batch_size=batch,
        warmup=args.warmup,
        repeats=repeats,
        threads=args.threads,
    )
    shape = common.input_shape(size)
    form = args.inference  # the measure stage's inference form, the same for both models
    options["channels_last"] = form.channels_last
    baseline, pruned = (
        inference_model(m.to(device), shape, form.runtime.value, form.fold_bn, form.channels_last)
        for m in (baseline, pruned)
    )
    # The baseline is timed again right before each pruned model rather than once per size:
    # on a shared machine the load drifts, and the ratio should compare like with like.
    return measure_latency(baseline, shape, **options), measure_latency(pruned, shape, **options)


def run(args: argparse.Namespace) -> list[Row]:
    settings = common.pruner_settings(args.training_steps, args.round_to)
    overrides = [
        f"measure.{key}={value}"
        for key, value in (
            ("runtime", args.runtime),
            ("fold_bn", args.fold_bn),
            ("channels_last", args.channels_last),
        )
        if value is not None
    ]
    args.inference = common.project_settings(overrides).measure
    form = args.inference
    print(
        f"# pruner.round_to {settings.round_to}, pruner.iterations {settings.iterations}; "
        f"inference form: runtime {form.runtime.value}, "
        f"fold_bn {form.fold_bn}, channels_last {form.channels_last}",
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
                for device in targets:
                    base_stats, pruned_stats = time_pair(
                        baseline, pruned, size, batch, device, args
                    )
                    rows.append(
                        Row(
                            size,
                            sparsity,
                            batch,
                            device.type,
                            params_ratio,
                            macs_ratio,
                            base_stats.as_dict(),
                            pruned_stats.as_dict(),
                        )
                    )
                    print(format_row(rows[-1]), flush=True)
            baseline.cpu()
    return rows


HEADER = (
    f"{'size':>7} {'sparsity':>8} {'batch':>5} {'device':>6} {'params':>7} {'MACs':>7} "
    f"{'base p50':>9} {'base sd':>8} {'pruned p50':>10} {'pruned sd':>9} {'latency':>8}"
)


def format_row(row: Row) -> str:
    return (
        f"{row.size:>3}x{row.size:<3} {row.sparsity:>8.2f} {row.batch:>5} {row.device:>6} "
        f"{row.params_ratio:>7.3f} {row.macs_ratio:>7.3f} "
        f"{row.baseline['p50']:>9.2f} {row.baseline['stdev']:>8.2f} "
        f"{row.pruned['p50']:>10.2f} {row.pruned['stdev']:>9.2f} {row.latency_ratio:>8.3f}"
    )


def summary(rows: list[Row]) -> str:
    """One line: how much of the MAC reduction became latency reduction for the reference
    case (largest size, smallest batch, CPU, sparsity nearest 0.15), and whether any pruned
    model was slower than its baseline."""
    if not rows:
        return "summary: no rows"
    size = max(row.size for row in rows)
    batch = min(row.batch for row in rows)
    device = "cpu" if any(row.device == "cpu" for row in rows) else rows[0].device
    candidates = [r for r in rows if r.size == size and r.batch == batch and r.device == device]
    ref = min(candidates, key=lambda r: abs(r.sparsity - 0.15))
    slower = [r for r in rows if r.latency_ratio > 1.0]
    verdict = "yes" if not slower else f"no ({len(slower)}/{len(rows)} rows slower)"
    return (
        f"summary: {size}x{size} batch {batch} {device} at s={ref.sparsity:g}: latency ratio "
        f"{ref.latency_ratio:.3f}, MACs ratio {ref.macs_ratio:.3f}, latency/MACs ratio "
        f"{ref.latency_ratio / ref.macs_ratio:.3f}; pruned never slower: {verdict}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet_warnings()
    print(
        f"# threads {args.threads}, warmup {args.warmup}, ratios are pruned / baseline, "
        f"times in ms per call; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    rows = run(args)
    # Other processes on the machine distort CPU timings the most: say how busy it was.
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    print(summary(rows))
    if args.json is not None:
        records = [asdict(row) | {"latency_ratio": row.latency_ratio} for row in rows]
        report = {"args": vars(args), "rows": records}
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
