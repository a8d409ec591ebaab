"""Print a run's figures as sglang.bench_serving does, and write the sweep's plots (PNG)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

RULE = "=" * 50


def _value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.2f}"
    return str(value)


def _line(label: str, value) -> str:
    return f"{label:<40} {_value(value):<10}"


def _section(title: str) -> str:
    return f"{title:-^50}"


def format_point(point: dict, header: dict[str, object]) -> str:
    """One run's table: `header` (label -> value) first, then sglang.bench_serving's rows."""
    lines = [f"{' Serving Benchmark Result ':=^50}"]
    lines += [_line(k + ":", v) for k, v in header.items()]
    lines += [
        _line("Successful requests:", point["completed"]),
        _line("Failed requests:", point["failed"]),
        _line("Benchmark duration (s):", point["duration_s"]),
        _line("Total input tokens:", point["total_input_tokens"]),
        _line("Total generated tokens:", point["total_output_tokens"]),
        _line("Request throughput (req/s):", point["request_throughput"]),
        _line("Input token throughput (tok/s):", point["input_throughput"]),
        _line("Output token throughput (tok/s):", point["output_throughput"]),
        _line("Total token throughput (tok/s):", point["total_throughput"]),
        _line("Concurrency:", point["concurrency"]),
    ]
    if "goodput" in point:
        lines.append(_line("Request goodput (req/s):", point["goodput"]["request_goodput"]))
    for title, key, names in (("End-to-End Latency", "e2e_latency_ms", "E2E Latency"),
                              ("Time to First Token", "ttft_ms", "TTFT"),
                              ("Time per Output Token (excl. 1st token)", "tpot_ms", "TPOT"),
                              ("Inter-token Latency", "itl_ms", "ITL")):
        lines.append(_section(title))
        for stat, value in point[key].items():
            label = stat.capitalize() if stat in ("mean", "median", "std", "max") else stat.upper()
            lines.append(_line(f"{label} {names} (ms):", value))
    if point["output_len_mismatches"]:
        lines.append(_line("Outputs not of the asked length:", point["output_len_mismatches"]))
    if point["usage_missing"]:
        lines.append(_line("Answers without usage (chunks counted):", point["usage_missing"]))
    for message, count in point["error_counts"].items():
        lines.append(f"failed x{count}: {message}")
    lines.append(RULE)
    return "\n".join(lines)


def format_sweep(points: Sequence[dict]) -> str:
    """One line per concurrency: throughput and the latency medians / p99s."""
    head = (f"{'conc':>5} {'ok':>5} {'fail':>5} {'req/s':>8} {'out tok/s':>10} {'TTFT med':>9} {'TTFT p99':>9} "
            f"{'TPOT med':>9} {'TPOT p99':>9} {'ITL med':>8}")
    rows = [head]
    for p in points:
        rows.append(f"{_value(p['max_concurrency']):>5} {p['completed']:>5} {p['failed']:>5} "
                    f"{p['request_throughput']:>8.2f} {p['output_throughput']:>10.1f} "
                    f"{_value(p['ttft_ms']['median']):>9} {_value(p['ttft_ms']['p99']):>9} "
                    f"{_value(p['tpot_ms']['median']):>9} {_value(p['tpot_ms']['p99']):>9} "
                    f"{_value(p['itl_ms']['median']):>8}")
    return "\n".join(rows)


def plot_sweep(points: Sequence[dict], stem: Path, title: str) -> list[Path]:
    """`<stem>_ttft.png`, `<stem>_tpot.png` (median and p99) and `<stem>_throughput.png` against
    concurrency (log2 axis); points with no successful request are left out of the lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["max_concurrency"] for p in points]
    written = []
    for name, key, ylabel in (("ttft", "ttft_ms", "TTFT (ms)"), ("tpot", "tpot_ms", "TPOT (ms)"),
                              ("throughput", None, "output tokens/s")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        if key is None:
            ax.plot(xs, [p["output_throughput"] for p in points], marker="o", label="output throughput")
        else:
            for stat, style in (("median", "-o"), ("p99", "--s")):
                pairs = [(x, p[key][stat]) for x, p in zip(xs, points) if p[key][stat] is not None]
                ax.plot([x for x, _ in pairs], [y for _, y in pairs], style, label=stat)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("max concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{name}.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
