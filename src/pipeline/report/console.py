"""The console summary of a run: baseline vs pruned, side by side, each change with how sure it
is."""

from __future__ import annotations


def _fmt_int(value: float) -> str:
    return f"{int(value):,}"


def accuracy_cell(change: dict) -> str:
    """ "-1.94 pts [-3.1, -0.8]", or "not significant" when the 95 % interval holds 0."""
    interval = f"[{change['ci_low']:+.2f}, {change['ci_high']:+.2f}]"
    verdict = "" if change["significant"] else ", not significant"
    return f"{change['points']:+.2f} pts {interval}{verdict}"


def latency_cell(ratio: dict) -> str:
    """The latency change with its sign (slower "+", faster "-") and its 95 % interval, or
    "no measurable difference" when the interval holds a ratio of 1."""
    percent = lambda value: f"{100.0 * (value - 1.0):+.1f}%"  # noqa: E731
    interval = f"[{percent(ratio['ci_low'])}, {percent(ratio['ci_high'])}]"
    if not ratio["measurable"]:
        return f"{percent(ratio['ratio'])} {interval}, no measurable difference"
    return f"{percent(ratio['ratio'])} {interval}"


def notes(record: dict) -> list[str]:
    """Warnings that change how the table should be read."""
    lines = []
    convergence = record.get("baseline_convergence")
    if convergence is not None and not convergence["converged"]:
        lines.append(
            "warning: the baseline had not converged (" + convergence["reason"] + "): the "
            "accuracy change may include extra training, not only the effect of pruning"
        )
    budget = (record.get("pruning") or {}).get("budget")
    if budget is not None:
        lines.append(budget_line(budget))
    change = record["accuracy_change"]
    lines.append(
        f"accuracy change: paired over {change['images']} test images, 95 % bootstrap interval; "
        f"only the baseline right on {change['only_baseline_right']}, only the pruned model on "
        f"{change['only_pruned_right']} (McNemar p={change['p_value']:.3g})"
    )
    ratio = record["latency_ratio"]
    load = ratio["load_average"]
    line = (
        f"latency: pruned/baseline {ratio['ratio']:.3f} [{ratio['ci_low']:.3f}, "
        f"{ratio['ci_high']:.3f}] at batch {ratio.get('batch_size', 1)} over {ratio['rounds']} "
        "alternating rounds"
    )
    others = [
        str(row["batch_size"])
        for row in record.get("latency_by_batch", [])[1:]
        if row["noisy"] and not ratio["noisy"]
    ]
    if others:
        line += f"; the intervals at batch {', '.join(others)} are too wide to trust"
    if ratio.get("busy_cores"):
        line += f"; {ratio['busy_cores']} of {load['cpus']} CPUs were busy with other work"
    if ratio["noisy"]:
        line += (
            f"; the machine was noisy (load average {load['before']:.2f} -> {load['after']:.2f}"
            f" on {load['cpus']} CPUs): rerun on an idle machine to trust it"
        )
    lines.append(line)
    return lines


def budget_line(budget: dict) -> str:
    """The budget asked for, whether the final model met it, and where it landed: "over" the
    target where budget.fallback=nearest took the step above a window no step lands in."""
    verdict = "met" if budget["met"] else "NOT met"
    target, tolerance = budget["target"], budget["tolerance"]
    # Records from before budget.fallback have no key: they kept the model below.
    nearest = budget.get("fallback", "below") == "nearest"
    ceiling = target + tolerance if nearest else target
    asked = (
        f"at most {target}"
        if budget["kind"] == "latency"
        else f"within [{target - tolerance:.4g}, {ceiling:.4g}]"
    )
    over = budget["kind"] != "latency" and budget["final"] > target
    return (
        f"budget: {budget['kind']} {asked} of the baseline's, {verdict}: "
        f"{budget['final']:.4f} (sparsity {budget['sparsity']:.4f}, found in "
        f"{len(budget['evaluations'])} prunings)"
        + (
            f"; over {target}: no whole-channel step lands in [{target - tolerance:.4g}, "
            f"{target}], budget.fallback=nearest took the nearest"
            if over
            else ""
        )
    )


def latency_rows(record: dict, in_format: str = "") -> list[tuple[str, str, str, str]]:
    """p50 of both models and the ratio with its interval at each batch size timed, then the
    p90 at the smallest (a record from before batch sizes: batch 1 only)."""
    base, pruned = record["baseline"], record["pruned"]
    device = base["latency_device"]
    by_batch = record.get("latency_by_batch") or [
        {
            "batch_size": 1,
            "baseline_ms": base["latency_ms"],
            "pruned_ms": pruned["latency_ms"],
        }
        | record["latency_ratio"]
    ]
    rows = [
        (
            f"latency p50 ({device}{in_format}, ms), batch {row['batch_size']}",
            f"{row['baseline_ms']['p50']:.2f}",
            f"{row['pruned_ms']['p50']:.2f}",
            latency_cell(row),
        )
        for row in by_batch
    ]
    rows.append(
        (
            f"latency p90 (ms), batch {by_batch[0]['batch_size']}",
            f"{base['latency_ms']['p90']:.2f}",
            f"{pruned['latency_ms']['p90']:.2f}",
            "",
        )
    )
    for row in by_batch:
        memory = row.get("peak_memory_mb") or {}
        if memory.get("baseline") and memory.get("pruned") is not None:
            rows.append(
                (
                    f"peak GPU memory (MiB), batch {row['batch_size']}",
                    f"{memory['baseline']:.1f}",
                    f"{memory['pruned']:.1f}",
                    f"{100 * (memory['pruned'] / memory['baseline'] - 1):+.1f}%",
                )
            )
    return rows


def summary_table(record: dict) -> str:
    base, pruned, reduction = record["baseline"], record["pruned"], record["reduction_pct"]
    # A format other than fp32 (measure.precision) is named where it applies; records made
    # before the option have no entry and were fp32.
    precision = base.get("runtime", {}).get("precision", "fp32")
    in_format = "" if precision == "fp32" else f", {precision}"
    rows = [
        (
            f"accuracy (top-1{in_format})",
            f"{base['accuracy']:.4f}",
            f"{pruned['accuracy']:.4f}",
            accuracy_cell(record["accuracy_change"]),
        ),
        ("top-5", f"{base['top5']:.4f}", f"{pruned['top5']:.4f}", ""),
        (
            "params",
            _fmt_int(base["params"]),
            _fmt_int(pruned["params"]),
            f"{-reduction['params']:+.1f}%",
        ),
        ("MACs", _fmt_int(base["macs"]), _fmt_int(pruned["macs"]), f"{-reduction['macs']:+.1f}%"),
        (
            "size (bytes)",
            _fmt_int(base["size_bytes"]),
            _fmt_int(pruned["size_bytes"]),
            f"{-reduction['size_bytes']:+.1f}%",
        ),
        *latency_rows(record, in_format),
        ("throughput (img/s)", f"{base['throughput']:.1f}", f"{pruned['throughput']:.1f}", ""),
    ]
    header = ("metric", "baseline", "pruned", "change")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    line = "+".join("-" * (w + 2) for w in widths)

    def fmt(row):
        return " " + " | ".join(
            str(cell).rjust(w) if i else str(cell).ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    stages = ", ".join(f"{name} {v['seconds']:.1f}s" for name, v in record["stages"].items())
    table = [line, fmt(header), line, *map(fmt, rows), line, f"stages: {stages}"]
    return "\n".join(table + notes(record))
