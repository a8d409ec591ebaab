"""Per-stage spans of every actor, on one clock, merged into a Chrome trace (Perfetto).

Each actor process owns a `Tracer`. A span is one stage of work — `tokenize`, a `prefill`
chunk step, a `decode` step, `handoff_send`, `handoff_receive` — with its request ids, start and
end in wall-clock nanoseconds (`time.time_ns`, the clock every process on a host shares; across
hosts it is as good as their clock sync), and attributes such as tokens, pages, bytes and batch
size. Spans are buffered and appended to `<trace_dir>/<actor>.jsonl` about once a second and at
exit. With no trace directory a tracer records nothing and costs one attribute check per span.

`merge_chrome_trace` turns a run's files into one Chrome-trace JSON (one process track per
actor, "X" complete events in microseconds); `stage_breakdown` + `format_breakdown` give the
time each request spent in each stage (`tandem trace DIR`).
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

STAGE_ORDER = ("tokenize", "encode", "prefill", "handoff_send", "handoff_receive", "decode")
ACTOR_ORDER = ("api", "preprocess", "vision_encoder", "audio_encoder", "engine", "prefill", "decode")


@dataclass(frozen=True)
class Span:
    """One stage of work in one actor; `requests` are the request ids it served (a batch step
    serves several)."""

    actor: str
    stage: str
    start_ns: int
    end_ns: int
    requests: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)  # tokens, pages, bytes, batch, ...

    def to_json(self) -> str:
        return json.dumps({"actor": self.actor, "stage": self.stage, "start_ns": self.start_ns,
                           "end_ns": self.end_ns, "requests": list(self.requests), "attrs": self.attrs},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "Span":
        d = json.loads(line)
        return cls(str(d["actor"]), str(d["stage"]), int(d["start_ns"]), int(d["end_ns"]),
                   tuple(str(r) for r in d.get("requests", ())), dict(d.get("attrs", {})))


class Tracer:
    """Records one actor's spans; `trace_dir=None` turns it off."""

    def __init__(self, actor: str, trace_dir: str | Path | None, flush_interval_s: float = 1.0,
                 max_buffered: int = 4096):
        self.actor = actor
        self.path = Path(trace_dir) / f"{actor}.jsonl" if trace_dir is not None else None
        self.enabled = self.path is not None
        self.flush_interval_ns = int(flush_interval_s * 1e9)
        self.max_buffered = max_buffered
        self._buffer: list[Span] = []
        self._last_flush = time.time_ns()
        self._on_gc = None  # the gc callback of `watch_gc`

    def watch_gc(self, min_ms: float = 1.0) -> None:
        """Record the garbage collector's pauses of at least `min_ms` as `gc` spans (generation,
        objects collected): a pause between two steps shows in the trace. Off without a trace
        directory; `unwatch_gc` undoes it."""
        if not self.enabled or self._on_gc is not None:
            return
        started = [0]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.time_ns()
            elif started[0] and time.time_ns() - started[0] >= min_ms * 1e6:
                self.record("gc", started[0], time.time_ns(), generation=info["generation"],
                            collected=info["collected"])

        self._on_gc = on_gc
        gc.callbacks.append(on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc is not None:
            gc.callbacks.remove(self._on_gc)
            self._on_gc = None

    @contextmanager
    def span(self, stage: str, requests: str | Iterable[str] = (), **attrs: Any) -> Iterator[dict[str, Any]]:
        """Time the body as one span; the yielded dict takes attributes known only at its end."""
        if not self.enabled:
            yield attrs
            return
        start = time.time_ns()
        try:
            yield attrs
        finally:
            self.record(stage, start, time.time_ns(), requests, **attrs)

    def record(self, stage: str, start_ns: int, end_ns: int, requests: str | Iterable[str] = (), **attrs: Any) -> None:
        """A span whose times were taken elsewhere (e.g. a handoff that began in another loop)."""
        if not self.enabled:
            return
        ids = (requests,) if isinstance(requests, str) else tuple(requests)
        self._buffer.append(Span(self.actor, stage, start_ns, end_ns, ids, attrs))
        if len(self._buffer) >= self.max_buffered or time.time_ns() - self._last_flush >= self.flush_interval_ns:
            self.flush()

    def tick(self) -> None:
        """From an actor's loop: write what waits once the flush interval has passed, so the last
        spans before a quiet spell reach the file without waiting for the next span."""
        if self._buffer and time.time_ns() - self._last_flush >= self.flush_interval_ns:
            self.flush()

    def flush(self) -> None:
        """Append buffered spans to this actor's file (one line each)."""
        self._last_flush = time.time_ns()
        if not self.enabled or not self._buffer:
            return
        lines = "".join(s.to_json() + "\n" for s in self._buffer)
        self._buffer.clear()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)


def read_spans(trace_dir: str | Path) -> list[Span]:
    """Every span of every actor file in `trace_dir`, by start time. A torn last line (an
    actor killed mid-write) is skipped."""
    spans = []
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                spans.append(Span.from_json(line))
            except (ValueError, KeyError, TypeError):
                continue
    return sorted(spans, key=lambda s: (s.start_ns, s.end_ns))


def _actor_key(actor: str) -> tuple[int, str]:
    kind, _, replica = actor.rpartition("-")
    kind = kind if replica.isdigit() else actor
    return (ACTOR_ORDER.index(kind) if kind in ACTOR_ORDER else len(ACTOR_ORDER), actor)


def chrome_trace(spans: list[Span]) -> dict[str, Any]:
    """Spans as a Chrome-trace object: one process (pid) and one thread (tid) per actor, named
    by metadata events; "X" events with ts/dur in microseconds from the first span."""
    actors = sorted({s.actor for s in spans}, key=_actor_key)
    pids = {actor: i + 1 for i, actor in enumerate(actors)}
    origin = min((s.start_ns for s in spans), default=0)
    events: list[dict[str, Any]] = []
    for actor, pid in pids.items():
        events += [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": pid, "args": {"name": actor}},
            {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": pid, "args": {"sort_index": pid}},
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": pid, "args": {"name": actor}},
        ]
    for s in spans:
        args = dict(s.attrs)
        if s.requests:
            args["requests"] = list(s.requests)
        events.append({"name": s.stage, "cat": s.actor.rpartition("-")[0] or s.actor, "ph": "X",
                       "ts": (s.start_ns - origin) / 1e3, "dur": max(0, s.end_ns - s.start_ns) / 1e3,
                       "pid": pids[s.actor], "tid": pids[s.actor], "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"origin_unix_ns": origin}}


def merge_chrome_trace(trace_dir: str | Path, out_path: str | Path) -> Path:
    """Write every actor's spans in `trace_dir` as one Chrome-trace JSON file at `out_path`."""
    out_path = Path(out_path)
    out_path.write_text(json.dumps(chrome_trace(read_spans(trace_dir))), encoding="utf-8")
    return out_path


@dataclass
class StageTime:
    """One request's time in one stage, summed over the spans that served it."""

    ns: int = 0
    spans: int = 0
    bytes: int = 0  # K/V bytes handed over (handoff_send)


@dataclass
class RequestBreakdown:
    request_id: str
    start_ns: int
    end_ns: int
    stages: dict[str, StageTime] = field(default_factory=dict)


def stage_breakdown(spans: Iterable[Span]) -> list[RequestBreakdown]:
    """Per request, the time of each stage (a batch step counts in full for each request in
    it: that is how long the request waited on it), in order of the requests' first span."""
    by_request: dict[str, RequestBreakdown] = {}
    for s in spans:
        for rid in s.requests:
            r = by_request.setdefault(rid, RequestBreakdown(rid, s.start_ns, s.end_ns))
            r.start_ns, r.end_ns = min(r.start_ns, s.start_ns), max(r.end_ns, s.end_ns)
            t = r.stages.setdefault(s.stage, StageTime())
            t.ns += s.end_ns - s.start_ns
            t.spans += 1
            t.bytes += int(s.attrs.get("bytes", 0)) if s.stage == "handoff_send" else 0
    return sorted(by_request.values(), key=lambda r: r.start_ns)


def draft_summary(spans: Iterable[Span]) -> str | None:
    """MTP totals over the `decode` spans (drafted, accepted, acceptance rate, drafts accepted
    per verify run); None when nothing was drafted."""
    drafted = accepted = runs = 0
    for s in spans:
        if s.stage == "decode" and s.attrs.get("drafted"):
            drafted += int(s.attrs["drafted"])
            accepted += int(s.attrs.get("accepted", 0))
            runs += int(s.attrs.get("verify_runs", 0))
    if not drafted:
        return None
    return (f"MTP: {drafted} drafted, {accepted} accepted (rate {accepted / drafted:.2f}), "
            f"{accepted / max(runs, 1):.2f} accepted per verify run over {runs}")


STEP_STAGES = ("prefill", "decode")


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "mean": round(sum(ordered) / len(ordered), 3), "median": round(pick(0.5), 3),
            "p90": round(pick(0.9), 3), "p99": round(pick(0.99), 3)}


def step_summary(spans: Iterable[Span]) -> dict[str, Any]:
    """Per engine actor, its steps' timeline: a step is the `prefill`/`decode` spans that share
    one start and end. Step wall times (ms) split into decode-only steps and steps that also ran
    prompt tokens; the host's time between steps (`gaps_ms`: the actor loop around `step`, where
    the device idles unless a launched step is running); the share of the busy stretch spent
    inside steps; decode batch sizes; and the garbage collector's recorded pauses."""
    steps: dict[str, dict[tuple[int, int], dict[str, int]]] = {}
    gc_ms: dict[str, float] = {}
    for s in spans:
        if s.stage in STEP_STAGES:
            step = steps.setdefault(s.actor, {}).setdefault((s.start_ns, s.end_ns), {})
            step[s.stage] = int(s.attrs.get("tokens", 0))
            if s.stage == "decode":
                step["batch"] = int(s.attrs.get("batch", 0))
        elif s.stage == "gc":
            gc_ms[s.actor] = gc_ms.get(s.actor, 0.0) + (s.end_ns - s.start_ns) / 1e6
    out: dict[str, Any] = {}
    for actor, by_time in sorted(steps.items(), key=lambda kv: _actor_key(kv[0])):
        timeline = sorted(by_time.items())
        decode_only = [(end - start) / 1e6 for (start, end), w in timeline if "prefill" not in w]
        mixed = [(end - start) / 1e6 for (start, end), w in timeline if "prefill" in w]
        gaps = [(b[0][0] - a[0][1]) / 1e6 for a, b in zip(timeline, timeline[1:])]
        busy = [g for g in gaps if g < 50.0]  # longer: the actor had nothing to run
        inside = sum(end - start for (start, end), _ in timeline) / 1e6
        batches = [w["batch"] for _, w in timeline if "batch" in w]
        out[actor] = {
            "steps": len(timeline), "decode_only_ms": _quantiles(decode_only), "with_prefill_ms": _quantiles(mixed),
            "prefill_tokens": sum(w.get("prefill", 0) for _, w in timeline),
            "decode_tokens": sum(w.get("decode", 0) for _, w in timeline),
            "decode_batch": _quantiles([float(b) for b in batches]),
            "gaps_ms": _quantiles(busy), "in_steps_share": round(inside / max(inside + sum(busy), 1e-9), 4),
            "gc_ms": round(gc_ms.get(actor, 0.0), 3),
        }
    return out


def format_breakdown(breakdown: list[RequestBreakdown]) -> str:
    """A text table: one row per request, one column per stage (milliseconds, and the number
    of spans where more than one), the request's wall time, and its handoff bytes."""
    seen = {stage for r in breakdown for stage in r.stages}
    stages = [s for s in STAGE_ORDER if s in seen] + sorted(seen - set(STAGE_ORDER))
    header = ["request", *stages, "wall", "kv bytes"]
    rows = [header]
    for r in breakdown:
        cells = [r.request_id]
        for stage in stages:
            t = r.stages.get(stage)
            cells.append("-" if t is None else f"{t.ns / 1e6:.2f}" + (f" x{t.spans}" if t.spans > 1 else ""))
        cells.append(f"{(r.end_ns - r.start_ns) / 1e6:.2f}")
        cells.append(str(sum(t.bytes for t in r.stages.values())))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], "(times in ms)"])
