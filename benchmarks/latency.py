"""Does pruning make MobileNetV2 faster, and by as much as its MACs shrink?

For each input size and sparsity the unpruned baseline is pruned and sped up with the project's
own stage functions, then baseline and pruned model are timed in alternating rounds with
pipeline.stages.measure.timed_pair, the measure stage's own timing, under the composed measure
settings (the timing options below are overrides of them); the ratio and its 95 % interval come
from pipeline.measure.uncertainty.latency_ratio, as in the measure stage.

With several --runtimes each row holds one column group per runtime; --profile adds, for each
size and sparsity, the time and MACs of each layer kind (pipeline.models.layer_profile).

    python benchmarks/latency.py
    python benchmarks/latency.py --sizes 32 --sparsities 0.15 0.5 --repeats 10 --json out.json
    python benchmarks/latency.py --sizes 32 --runtimes eager,onnxruntime,compile --profile
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

from pipeline.config.schema import MeasureSettings
from pipeline.measure.latency import cpu_threads
from pipeline.measure.runtime_forms import CUDA_ONLY_RUNTIMES, RUNTIMES, inference_model
from pipeline.models.layer_profile import KINDS, macs_by_kind, profile_by_kind
from pipeline.models.stats import count_macs, count_params

# Above this batch size a forward pass of the 224x224 model takes a large fraction of a second
# on a small CPU, so the default repeats are cut to keep the whole run within minutes.
LARGE_BATCH = 8
REPEATS, LARGE_BATCH_REPEATS = 30, 10
PROFILE_REPEATS = 20


@dataclass
class Timing:
    """One runtime's figures for a row."""

    baseline: dict
    pruned: dict
    # pipeline.measure.uncertainty.latency_ratio: ratio, ci_low, ci_high, round_ratios, ...
    ratio: dict
    memory: dict | None = None  # CUDA: each model's peak memory of a call, MiB

    @property
    def memory_ratio(self) -> float | None:
        if not self.memory or not self.memory.get("baseline") or self.memory["pruned"] is None:
            return None
        return self.memory["pruned"] / self.memory["baseline"]

    @property
    def latency_ratio(self) -> float:
        return self.ratio["ratio"]

    @property
    def measurably_slower(self) -> bool:
        return self.ratio["ci_low"] > 1.0

    @property
    def no_measurable_difference(self) -> bool:
        return self.ratio["ci_low"] <= 1.0 <= self.ratio["ci_high"]


@dataclass
class Row:
    size: int
    sparsity: float
    batch: int
    device: str
    params_ratio: float
    macs_ratio: float
    runtimes: dict[str, Timing | None]  # in --runtimes order; None: cannot run on the device


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
        "--runtimes",
        "--runtime",
        type=runtime_list,
        default=None,
        help=f"comma list of {' | '.join(RUNTIMES)}: each row times the pair in each "
        "(default: measure.runtime in conf/; --runtime is the same option)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="per size and sparsity, each layer kind's batch-1 CPU time in the eager form "
        f"(torch.profiler, {PROFILE_REPEATS} calls per model) and MACs, pruned / baseline",
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


def runtime_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in RUNTIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed a comma list of {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def devices(names: list[str]) -> list[torch.device]:
    return [torch.device(name) for name in names if name == "cpu" or torch.cuda.is_available()]


def measure_settings(args: argparse.Namespace, runtime: str | None = None) -> MeasureSettings:
    """The project's measure settings with this run's timing options as overrides: threads,
    warm-up and batch-1 repeats always; rounds and the inference form where an option names
    them (`runtime`: one of --runtimes; None keeps measure.runtime)."""
    return common.measure_settings(
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats or REPEATS,
        rounds=args.rounds,
        runtime=runtime,
        fold_bn=args.fold_bn,
        channels_last=args.channels_last,
    )


def runtime_settings(args: argparse.Namespace) -> dict[str, MeasureSettings]:
    """The measure settings of each runtime to time, in --runtimes order."""
    if args.runtimes is None:
        default = measure_settings(args)
        return {default.runtime.value: default}
    return {runtime: measure_settings(args, runtime) for runtime in args.runtimes}


def run(args: argparse.Namespace, forms: dict[str, MeasureSettings]) -> list[Row]:
    settings = common.pruner_settings(args.training_steps, args.round_to)
    measure = next(iter(forms.values()))
    print(
        f"# pruner.round_to {settings.round_to}, pruner.iterations {settings.iterations}; "
        f"inference forms: runtimes {', '.join(forms)}, "
        f"fold_bn {measure.fold_bn}, channels_last {measure.channels_last}",
        flush=True,
    )
    print(header(list(forms)), flush=True)
    targets = devices(args.devices)
    skipped = {"cpu": set(CUDA_ONLY_RUNTIMES), "cuda": set()}
    if "onnxruntime" in forms and any(device.type == "cuda" for device in targets):
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            skipped["cuda"].add("onnxruntime")
            print(
                "# onnxruntime has no CUDA provider here (install onnxruntime-gpu): its cuda "
                "cells are left empty rather than filled with CPU timings",
                flush=True,
            )
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
            if args.profile:
                print(kind_table(baseline, pruned, shape, measure), flush=True)
            for batch in args.batch_sizes:
                # None: measure.repeats, which --repeats (when given) sets for every batch.
                few = batch > LARGE_BATCH and args.repeats is None
                repeats = LARGE_BATCH_REPEATS if few else None
                for device in targets:
                    timings = {}
                    for runtime, measure_runtime in forms.items():
                        if runtime in skipped[device.type]:
                            timings[runtime] = None
                            continue
                        # The baseline is timed again with each pruned model, in alternating
                        # rounds: load that drifts lands on both sides of a round alike.
                        pair, ratio, memory = common.timed_ratio(
                            baseline,
                            pruned,
                            size,
                            device,
                            measure_runtime,
                            batch_size=batch,
                            repeats=repeats,
                        )
                        timings[runtime] = Timing(
                            pair.baseline.as_dict(), pair.pruned.as_dict(), ratio, memory
                        )
                    rows.append(
                        Row(
                            size,
                            sparsity,
                            batch,
                            device.type,
                            params_ratio,
                            macs_ratio,
                            timings,
                        )
                    )
                    print(format_row(rows[-1]), flush=True)
            baseline.cpu()
    return rows


COLUMNS = f"{'size':>7} {'sparsity':>8} {'batch':>5} {'device':>6} {'params':>7} {'MACs':>7}"
RUNTIME_COLUMNS = (
    f"{'base p50':>9} {'pruned p50':>10} {'latency':>8} {'ci low':>7} {'ci high':>7} "
    f"{'lat/MACs':>8} {'memory':>7}"
)


def header(runtimes: list[str]) -> str:
    """Two lines: each runtime's name over its column group, then the column names."""
    names = " ".join(f"{f' {runtime} ':-^{len(RUNTIME_COLUMNS)}}" for runtime in runtimes)
    columns = " ".join(RUNTIME_COLUMNS for _ in runtimes)
    return f"{' ' * len(COLUMNS)} | {names}\n{COLUMNS} | {columns}"


def format_row(row: Row) -> str:
    """One row's cells; memory: the pruned/baseline peak memory of a call (CUDA only)."""

    def group(t: Timing | None) -> str:
        if t is None:
            return f"{'-':>{len(RUNTIME_COLUMNS)}}"
        memory = f"{t.memory_ratio:>7.3f}" if t.memory_ratio is not None else f"{'-':>7}"
        return (
            f"{t.baseline['p50']:>9.2f} {t.pruned['p50']:>10.2f} {t.latency_ratio:>8.3f} "
            f"{t.ratio['ci_low']:>7.3f} {t.ratio['ci_high']:>7.3f} "
            f"{t.latency_ratio / row.macs_ratio:>8.3f} {memory}"
        )

    groups = " ".join(group(t) for t in row.runtimes.values())
    return (
        f"{row.size:>3}x{row.size:<3} {row.sparsity:>8.2f} {row.batch:>5} {row.device:>6} "
        f"{row.params_ratio:>7.3f} {row.macs_ratio:>7.3f} | {groups}"
    )


def kind_table(
    baseline: torch.nn.Module,
    pruned: torch.nn.Module,
    shape: tuple[int, ...],
    measure: MeasureSettings,
) -> str:
    """Each layer kind's batch-1 CPU milliseconds in both models' eager forms (fold_bn and
    channels_last as timed), their ratio and the kind's MACs ratio; a kind whose time ratio
    stays above its MACs ratio keeps time that its MACs no longer account for."""
    times, macs = {}, {}
    for name, model in (("baseline", baseline), ("pruned", pruned)):
        form = inference_model(model.cpu(), shape, "eager", measure.fold_bn, measure.channels_last)
        with cpu_threads(measure.threads):
            times[name] = profile_by_kind(form, shape, PROFILE_REPEATS, warmup=measure.warmup)
        macs[name] = macs_by_kind(form, shape)
    lines = [f"#   {'layer kind':<15} {'base ms':>8} {'pruned ms':>9} {'time':>6} {'MACs':>6}"]
    for kind in (*KINDS, "total"):
        base_ms = sum(times["baseline"].values()) if kind == "total" else times["baseline"][kind]
        pruned_ms = sum(times["pruned"].values()) if kind == "total" else times["pruned"][kind]
        base_macs = sum(macs["baseline"].values()) if kind == "total" else macs["baseline"][kind]
        pruned_macs = sum(macs["pruned"].values()) if kind == "total" else macs["pruned"][kind]
        lines.append(
            f"#   {kind:<15} {base_ms:>8.3f} {pruned_ms:>9.3f} {_ratio(pruned_ms, base_ms)} "
            f"{_ratio(pruned_macs, base_macs)}"
        )
    return "\n".join(lines)


def _ratio(pruned: float, baseline: float) -> str:
    return f"{pruned / baseline:>6.3f}" if baseline else f"{'-':>6}"


def summary(rows: list[Row]) -> str:
    """One line per runtime: how much of the MAC reduction became latency reduction for the
    reference case (largest size, smallest batch, CPU where the runtime runs there, sparsity
    nearest 0.15), and whether any
    pruned model was measurably slower than its baseline (its whole interval above 1)."""
    if not rows:
        return "summary: no rows"
    size = max(row.size for row in rows)
    batch = min(row.batch for row in rows)
    device = "cpu" if any(row.device == "cpu" for row in rows) else rows[0].device
    lines = []
    for runtime in rows[0].runtimes:
        timed = [r for r in rows if r.runtimes[runtime] is not None]
        refs = [r for r in timed if r.size == size and r.batch == batch]
        if not refs:
            lines.append(f"summary {runtime}: not timed")
            continue
        ref = min(refs, key=lambda r: (r.device != device, abs(r.sparsity - 0.15)))
        timing = ref.runtimes[runtime]
        case = f"{size}x{size} batch {batch} {ref.device} at s={ref.sparsity:g}"
        slower = sum(r.runtimes[runtime].measurably_slower for r in timed)
        unclear = sum(r.runtimes[runtime].no_measurable_difference for r in timed)
        verdict = "yes" if not slower else f"no ({slower}/{len(timed)} rows measurably slower)"
        ratios = (
            f"latency ratio {timing.latency_ratio:.3f} "
            f"[{timing.ratio['ci_low']:.3f}, {timing.ratio['ci_high']:.3f}], "
            f"MACs ratio {ref.macs_ratio:.3f}, "
            f"latency/MACs ratio {timing.latency_ratio / ref.macs_ratio:.3f}"
        )
        counts = (
            f"pruned never slower: {verdict}; no measurable difference: {unclear}/{len(timed)} rows"
        )
        lines.append(f"summary {runtime}: {case}: {ratios}; {counts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet_warnings()
    forms = runtime_settings(args)
    measure = next(iter(forms.values()))
    print(
        f"# threads {measure.threads}, warmup {measure.warmup}, {measure.rounds} alternating "
        f"rounds, ratios are pruned / baseline with 95 % intervals, "
        f"times in ms per call; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    rows = run(args, forms)
    # Other processes on the machine distort CPU timings the most: say how busy it was.
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    print(summary(rows))
    if args.json is not None:
        records = [
            asdict(row)
            | {
                "latency_ratio": {
                    name: t.latency_ratio for name, t in row.runtimes.items() if t is not None
                }
            }
            for row in rows
        ]
        settings = {runtime: asdict(form) for runtime, form in forms.items()}
        report = {"args": vars(args), "measure": settings, "rows": records}
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
