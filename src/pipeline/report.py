"""The console summary of a run: baseline vs pruned, side by side."""

from __future__ import annotations


def _fmt_int(value: float) -> str:
    return f"{int(value):,}"


def summary_table(record: dict) -> str:
    base, pruned, reduction = record["baseline"], record["pruned"], record["reduction_pct"]
    rows = [
        (
            "accuracy (top-1)",
            f"{base['accuracy']:.4f}",
            f"{pruned['accuracy']:.4f}",
            f"{-record['accuracy_drop_points']:+.2f} pts",
        ),
        ("top-5", f"{base['top5']:.4f}", f"{pruned['top5']:.4f}", ""),
        (
            "params",
            _fmt_int(base["params"]),
            _fmt_int(pruned["params"]),
            f"-{reduction['params']:.1f}%",
        ),
        ("MACs", _fmt_int(base["macs"]), _fmt_int(pruned["macs"]), f"-{reduction['macs']:.1f}%"),
        (
            "size (bytes)",
            _fmt_int(base["size_bytes"]),
            _fmt_int(pruned["size_bytes"]),
            f"-{reduction['size_bytes']:.1f}%",
        ),
        (
            f"latency p50 ({base['latency_device']}, ms)",
            f"{base['latency_ms']['p50']:.2f}",
            f"{pruned['latency_ms']['p50']:.2f}",
            f"-{reduction['latency_p50']:.1f}%",
        ),
        (
            "latency p90 (ms)",
            f"{base['latency_ms']['p90']:.2f}",
            f"{pruned['latency_ms']['p90']:.2f}",
            "",
        ),
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
    return "\n".join([line, fmt(header), line, *map(fmt, rows), line, f"stages: {stages}"])
