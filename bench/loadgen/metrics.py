"""The run's figures, defined as `sglang.bench_serving` defines them.

Throughputs divide the completed requests' tokens by the run's duration. TTFT and E2E are per
request; TPOT per request is (E2E - TTFT) / (output tokens - 1) (requests of one token have none);
ITL pools every gap between output chunks of every request. Each gets mean, median, std (population),
p90 and p99 (NumPy's linear percentiles), ITL also p95 and max; all in milliseconds. Failed
requests count only as failures. Goodput (as vLLM's `--goodput`) is the rate of completed requests
that met every stated limit (TTFT, TPOT, E2E in ms).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .client import RequestResult

MAX_ERRORS_KEPT = 10
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class Goodput:
    """Per-request limits in milliseconds (None: no limit on that figure)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items: Sequence[str]) -> "Goodput":
        """['ttft:200', 'tpot:20'] -> Goodput(200, 20, None)."""
        limits: dict[str, float] = {}
        for item in items:
            key, _, value = item.partition(":")
            if key not in SLO_KEYS or not value:
                raise ValueError(f"goodput limit {item!r}: write KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
            limits[f"{key}_ms"] = float(value)
        return cls(**limits)

    def met(self, result: RequestResult) -> bool:
        tpot = result.tpot
        return (result.success
                and (self.ttft_ms is None or result.ttft * 1e3 <= self.ttft_ms)
                and (self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms)
                and (self.e2el_ms is None or result.e2e * 1e3 <= self.e2el_ms))


def distribution(values_s: Sequence[float], extra: bool = False) -> dict[str, float | None]:
    """mean / median / std / p90 / p99 (and p95 / max with `extra`) of seconds, in ms."""
    keys = ["mean", "median", "std", "p90", "p95", "p99", "max"] if extra else ["mean", "median", "std", "p90", "p99"]
    if len(values_s) == 0:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    stats = {"mean": ms.mean(), "median": np.median(ms), "std": ms.std(),
             "p90": np.percentile(ms, 90), "p99": np.percentile(ms, 99)}
    if extra:
        stats.update(p95=np.percentile(ms, 95), max=ms.max())
    return {k: float(stats[k]) for k in keys}


def summarize(results: Sequence[RequestResult], duration_s: float, goodput: Goodput | None = None) -> dict:
    """Every figure of one run as a flat-ish JSON-ready dict."""
    done = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    errors = Counter(r.error for r in failed)
    summary = {
        "completed": len(done),
        "failed": len(failed),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "input_throughput": total_in / duration_s,
        "output_throughput": total_out / duration_s,
        "total_throughput": (total_in + total_out) / duration_s,
        "concurrency": sum(r.e2e for r in done) / duration_s,  # mean requests in flight
        "mean_input_tokens": total_in / len(done) if done else None,
        "mean_output_tokens": total_out / len(done) if done else None,
        "output_len_mismatches": sum(r.output_tokens != r.output_len_asked for r in done),
        "usage_missing": sum(not r.usage_reported for r in done),
        "ttft_ms": distribution([r.ttft for r in done]),
        "tpot_ms": distribution([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": distribution([gap for r in done for gap in r.itls], extra=True),
        "e2e_latency_ms": distribution([r.e2e for r in done]),
        "errors": [r.error for r in failed[:MAX_ERRORS_KEPT]],
        "error_counts": dict(errors.most_common(MAX_ERRORS_KEPT)),
    }
    if goodput is not None:
        good = sum(goodput.met(r) for r in done)
        summary["goodput"] = {"limits_ms": {k: v for k, v in vars(goodput).items() if v is not None},
                              "requests_met": good, "request_goodput": good / duration_s}
    return summary


def request_details(results: Sequence[RequestResult]) -> list[dict]:
    """Per request: what it asked, what it got, its timings (ms) and its error."""
    return [{"index": r.index, "success": r.success, "error": r.error, "start_ms": r.start * 1e3,
             "ttft_ms": None if r.ttft is None else r.ttft * 1e3,
             "e2e_ms": None if r.e2e is None else r.e2e * 1e3,
             "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
             "output_len_asked": r.output_len_asked, "finish_reason": r.finish_reason,
             "itl_ms": [gap * 1e3 for gap in r.itls]} for r in results]
