"""Prometheus metrics of one app, in its own registry (no process-global state).

Requests by route and status; time to first token, time per output token and end-to-end
latency histograms; requests in flight at the api; and, read from the actors' latest
`ActorStats` at scrape time, their queue depths, KV pages in use, decode batch size and MTP
draft counts (with the acceptance rate and mean accept length they give).
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from actors.messages import ActorStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

ACTOR_GAUGES = (
    ("tandem_actor_waiting_requests", "requests queued in an engine actor", "waiting"),
    ("tandem_actor_running_requests", "requests in an engine actor's running batch", "running"),
    ("tandem_kv_pages_used", "KV cache pages in use", "kv_pages_used"),
    ("tandem_kv_pages_total", "KV cache pages in all", "kv_pages_total"),
    ("tandem_decode_batch_size", "sequences that got a token in the actor's last step", "decode_batch"),
    ("tandem_peak_batch_size", "the most sequences that got a token in one step of the actor", "peak_batch"),
    ("tandem_engine_steps", "engine steps run so far", "steps"),
    ("tandem_spec_drafted_tokens", "MTP draft tokens verified so far", "drafted_tokens"),
    ("tandem_spec_accepted_tokens", "MTP draft tokens accepted so far", "accepted_tokens"),
    ("tandem_spec_verify_runs", "MTP sequence-steps that verified drafts so far", "verify_runs"),
)
# Ratios of the counters above, per actor (0 before any draft).
SPEC_RATIOS = (
    ("tandem_spec_acceptance_rate", "MTP accepted / drafted tokens", "accepted_tokens", "drafted_tokens"),
    ("tandem_spec_mean_accept_length", "MTP drafts accepted per verify run", "accepted_tokens", "verify_runs"),
)


class _ActorCollector:
    """Gauges from the actors' latest reports, read when /metrics is scraped."""

    def __init__(self, stats: Callable[[], Iterable[ActorStats]], in_flight: Callable[[], int],
                 retried: Callable[[], int]):
        self.stats = stats
        self.in_flight = in_flight
        self.retried = retried

    def collect(self):
        reports = list(self.stats())
        for name, doc, attr in ACTOR_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["actor", "replica"])
            for report in reports:
                family.add_metric([report.actor, str(report.replica)], getattr(report, attr))
            yield family
        for name, doc, num, den in SPEC_RATIOS:
            family = GaugeMetricFamily(name, doc, labels=["actor", "replica"])
            for report in reports:
                d = getattr(report, den)
                family.add_metric([report.actor, str(report.replica)], getattr(report, num) / d if d else 0.0)
            yield family
        yield GaugeMetricFamily("tandem_api_requests_in_flight", "engine requests the api is waiting on",
                                value=self.in_flight())
        yield CounterMetricFamily("tandem_requests_retried", "requests sent again after an actor died before "
                                  "they streamed", value=self.retried())


class ApiMetrics:
    def __init__(self, stats: Callable[[], Iterable[ActorStats]], in_flight: Callable[[], int],
                 retried: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("tandem_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "request start to its first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("tandem_time_per_output_token_seconds", "mean time per token after the first",
                              buckets=TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("tandem_request_latency_seconds", "request start to its last token",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_ActorCollector(stats, in_flight, retried))

    def count(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def observe(self, started: float, first_token: float | None, finished: float, tokens: int) -> None:
        if first_token is None:
            return
        self.ttft.observe(first_token - started)
        self.e2e.observe(finished - started)
        if tokens > 1:
            self.tpot.observe((finished - first_token) / (tokens - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
