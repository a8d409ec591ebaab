"""Soak: a steady mixed load for a long while; errors, memory and latency must not drift.

Starts `tandem serve` (`--topology`, default the CPU colocated one) and keeps `--clients`
concurrent clients busy for `--duration-s` (600) with a mix of requests: streamed chats,
non-streamed completions, JSON-schema answers, requests that must be refused (bad JSON, a
bad parameter: 4xx expected) and streams the client drops after the first chunk. Every
`--window-s` (10) it samples the server processes' total RSS (the launcher and every actor),
and per window the p50 / p99 latency of the requests that finished and the counts of outcomes.

Verdict (after `--warmup-s`): no unexpected outcome (a 5xx, a transport error, a refused
request answered 2xx, a stream without [DONE]); memory growth under 5% (the last window's RSS
against the first's); p99 stable: the p99 of every request that finished in the last
`--judge-s` (60) seconds at most 1.5x that of the first `--judge-s` after the warm-up (pooled
over several windows: one window's p99 is too few requests to compare).

    PYTHONPATH=. python bench/soak.py --commit <sha> --out bench/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import Served  # noqa: E402

KINDS = (("stream_chat", 0.55), ("completion", 0.2), ("json_schema", 0.1), ("bad_request", 0.08),
         ("disconnect", 0.07))
SCHEMA = {"type": "object", "properties": {"word": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["word", "n"]}
MEMORY_GROWTH_LIMIT = 0.05
P99_DRIFT_LIMIT = 1.5


@dataclass
class Window:
    start_s: float
    latencies: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    rss_bytes: int = 0

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: None)
        return {"start_s": round(self.start_s, 1), "finished": len(lat), "p50_s": pick(0.5), "p99_s": pick(0.99),
                "outcomes": dict(self.outcomes), "rss_mib": round(self.rss_bytes / 2**20, 1)}


def server_rss(server: Served) -> int:
    total = 0
    for proc in [psutil.Process(server.process.pid), *server.descendants()]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


async def one_request(client: httpx.AsyncClient, url: str, kind: str, rng: random.Random) -> tuple[str, float]:
    """(outcome, seconds): outcome is `ok`, `refused` (a 4xx where one is due), `dropped` (a
    stream we closed), or `unexpected:<what>`."""
    words = " ".join(rng.choice(("river", "stone", "lantern", "moss", "cedar", "amber")) for _ in range(4))
    chat = {"model": "tandem-default", "messages": [{"role": "user", "content": f"Copy: {words}"}],
            "max_tokens": rng.randint(8, 24), "temperature": rng.choice((0, 0.7))}
    t0 = time.perf_counter()
    try:
        if kind == "bad_request":
            body = rng.choice((b"{not json", json.dumps({**chat, "temperature": -3}).encode()))
            r = await client.post(f"{url}/v1/chat/completions", content=body,
                                  headers={"content-type": "application/json"})
            return ("refused" if 400 <= r.status_code < 500 else f"unexpected:status {r.status_code}"), \
                time.perf_counter() - t0
        if kind == "completion":
            r = await client.post(f"{url}/v1/completions", json={"model": "tandem-default", "prompt": f"Copy: {words}",
                                                                  "max_tokens": chat["max_tokens"]})
            return ("ok" if r.status_code == 200 else f"unexpected:status {r.status_code}"), time.perf_counter() - t0
        if kind == "json_schema":
            body = {**chat, "response_format": {"type": "json_schema",
                                                "json_schema": {"name": "w", "schema": SCHEMA}}, "max_tokens": 48}
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            if r.status_code != 200:
                return f"unexpected:status {r.status_code}", time.perf_counter() - t0
            choice = r.json()["choices"][0]
            if choice["finish_reason"] == "stop":
                json.loads(choice["message"]["content"])  # the grammar guarantees it
            return "ok", time.perf_counter() - t0
        async with client.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}) as r:
            if r.status_code != 200:
                return f"unexpected:status {r.status_code}", time.perf_counter() - t0
            done = False
            async for line in r.aiter_lines():
                if kind == "disconnect" and line.startswith("data: "):
                    return "dropped", time.perf_counter() - t0  # closing the stream cancels the request
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"error"' in line:
                    return "unexpected:error event", time.perf_counter() - t0
            return ("ok" if done else "unexpected:no [DONE]"), time.perf_counter() - t0
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return f"unexpected:{type(exc).__name__}", time.perf_counter() - t0


async def drive(url: str, args, server: Served | None) -> list[Window]:
    windows = [Window(0.0)]
    start = time.perf_counter()
    stop_at = start + args.duration_s
    kinds, weights = zip(*KINDS)

    async def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=args.request_timeout_s) as client:
            while time.perf_counter() < stop_at:
                kind = rng.choices(kinds, weights)[0]
                outcome, seconds = await one_request(client, url, kind, rng)
                window = windows[-1]
                window.outcomes[outcome] = window.outcomes.get(outcome, 0) + 1
                if outcome == "ok":
                    window.latencies.append(seconds)

    async def sampler() -> None:
        while time.perf_counter() < stop_at:
            await asyncio.sleep(args.window_s)
            windows[-1].rss_bytes = server_rss(server) if server is not None else 0
            print(time.strftime("%H:%M:%S"), json.dumps(windows[-1].summary()), flush=True)
            if time.perf_counter() < stop_at:
                windows.append(Window(time.perf_counter() - start))

    await asyncio.gather(sampler(), *(client_loop(args.seed + i) for i in range(args.clients)))
    return windows


def pooled_p99(windows: list[Window], warmup_s: float, judge_s: float) -> tuple[float | None, float | None]:
    """p99 of the requests that finished in the first `judge_s` after the warm-up, and in the last."""
    steady = [w for w in windows if w.start_s >= warmup_s]
    if not steady:
        return None, None
    first = [t for w in steady if w.start_s < steady[0].start_s + judge_s for t in w.latencies]
    last = [t for w in steady if w.start_s >= steady[-1].start_s - judge_s + 1e-9 for t in w.latencies]
    p99 = (lambda xs: sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else None)
    return p99(first), p99(last)


def verdict(windows: list[dict], warmup_s: float, p99_first: float | None = None,
            p99_last: float | None = None) -> dict:
    """`p99_first` / `p99_last`: pooled (`pooled_p99`); by default the median of the first and
    last three windows' own p99."""
    steady = [w for w in windows if w["start_s"] >= warmup_s and w["finished"]]
    unexpected = {k: v for w in windows for k, v in w["outcomes"].items() if k.startswith("unexpected")}
    out: dict = {"unexpected": unexpected, "steady_windows": len(steady)}
    if len(steady) >= 2:
        growth = steady[-1]["rss_mib"] / steady[0]["rss_mib"] - 1 if steady[0]["rss_mib"] else 0.0
        head = p99_first if p99_first is not None else statistics.median(w["p99_s"] for w in steady[:3])
        tail = p99_last if p99_last is not None else statistics.median(w["p99_s"] for w in steady[-3:])
        out.update(memory_growth=growth, p99_first_s=head, p99_last_s=tail, p99_drift=tail / head)
        out["pass"] = not unexpected and growth < MEMORY_GROWTH_LIMIT and tail <= P99_DRIFT_LIMIT * head
    else:
        out["pass"] = False
        out["why"] = "too few windows after the warm-up to judge"
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--topology", default="cpu_colocated")
    ap.add_argument("--duration-s", type=float, default=600)
    ap.add_argument("--window-s", type=float, default=10)
    ap.add_argument("--warmup-s", type=float, default=30)
    ap.add_argument("--judge-s", type=float, default=60, help="p99 pooled over this long at the start and the end")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout-s", type=float, default=120)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        log = Path(tmp) / "serve.log"
        with Served(["serve", "--topology", args.topology], log=log) as server:
            raw = asyncio.run(drive(server.url, args, server))
            windows = [w.summary() for w in raw]
            p99_first, p99_last = pooled_p99(raw, args.warmup_s, args.judge_s)
            code = server.stop()
            tail = log.read_text()[-2000:]
    doc = {"benchmark": "soak", "command": "python bench/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": args.commit, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "mix": dict(KINDS), "criteria": {"memory_growth_below": MEMORY_GROWTH_LIMIT,
                                            "p99_last_over_first_at_most": P99_DRIFT_LIMIT,
                                            "pooled_over_s": args.judge_s},
           "windows": windows, "verdict": verdict(windows, args.warmup_s, p99_first, p99_last),
           "server_exit_code": code}
    if code != 0:
        doc["server_log_tail"] = tail
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["verdict"], indent=1))
    return doc


if __name__ == "__main__":
    main()
