"""Offer a workload's requests to a server: arrivals, a concurrency cap, warm-up, progress.

As `sglang.bench_serving` does: request i arrives at its Poisson time (all at once for an infinite
rate) measured from the run's start, waits for a free slot when `max_concurrency` caps the
requests in flight, and is timed from the moment it is sent. The run lasts from the first arrival
to the last completion. Warm-up requests go first, are not counted, and if every one of them fails
the run stops (`WarmupFailed`) instead of timing a server that is not answering.

Bodies are built ahead in worker threads (`prefetch` of them ready before the clock starts), so
encoding large images never delays an arrival and at most `prefetch` + the requests in flight are
held in memory.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
import numpy as np
from tqdm import tqdm

from .client import RequestResult, send_request
from .workload import PreparedRequest, Workload

WARMUP_OUTPUT_LEN = 32


@dataclass(frozen=True)
class LoadConfig:
    """How the requests are offered."""

    base_url: str
    model: str
    max_concurrency: int | None = None  # None: no cap
    request_rate: float = math.inf  # requests per second, Poisson arrivals
    warmup_requests: int = 1
    request_timeout_s: float | None = None  # per request, whole answer
    seed: int = 1  # arrival times
    api_key: str | None = None
    progress: bool = True
    prefetch: int | None = None  # bodies built ahead (default: the cap + 16, or 64)
    build_threads: int = 4

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be positive (inf: all at once)")
        if self.warmup_requests < 0:
            raise ValueError("warmup_requests must be >= 0")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RunResult:
    """The timed requests (in workload order) and the run's duration in seconds."""

    results: list[RequestResult]
    duration_s: float
    warmup: list[RequestResult]


class WarmupFailed(RuntimeError):
    """Every warm-up request failed; `errors` has their messages."""

    def __init__(self, errors: list[str]):
        super().__init__("every warm-up request failed: " + "; ".join(errors[:3]))
        self.errors = errors


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request arrives: 0 for all at an infinite rate,
    else a Poisson process (exponential gaps of mean 1/rate; the first request at 0)."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return [0.0, *np.cumsum(gaps[:-1]).tolist()][:n]


class Prefetcher:
    """Builds `build(i)` for i = 0.. in worker threads, keeping `depth` ready ahead of `take`."""

    def __init__(self, build: Callable[[int], PreparedRequest], n: int, depth: int, executor: ThreadPoolExecutor):
        self.build, self.n, self.depth, self.executor = build, n, max(depth, 1), executor
        self.pending: dict[int, asyncio.Future] = {}
        self.next_index = 0

    def _top_up(self, upto: int) -> None:
        loop = asyncio.get_running_loop()
        while self.next_index < min(upto, self.n):
            self.pending[self.next_index] = loop.run_in_executor(self.executor, self.build, self.next_index)
            self.next_index += 1

    async def fill(self) -> None:
        self._top_up(self.depth)
        if self.pending:
            await asyncio.gather(*self.pending.values())

    async def take(self, index: int) -> PreparedRequest:
        self._top_up(index + 1 + self.depth)
        return await self.pending.pop(index)


def new_http_client() -> aiohttp.ClientSession:
    """One connection pool for the run: no cap on connections, no proxies from the environment.

    aiohttp (C HTTP parser) rather than httpx: at thousands of streamed chunks per second a
    pure-Python client's own time per chunk would show up in the latencies it measures.
    """
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=60.0), trust_env=False)


async def warm_up(http: aiohttp.ClientSession, workload: Workload, load: LoadConfig) -> list[RequestResult]:
    """`load.warmup_requests` short requests (the first prompts, at most 32 output tokens) at once."""
    if load.warmup_requests == 0:
        return []
    requests = [workload.request(i % len(workload), load.model,
                                 min(workload.output_lens[i % len(workload)], WARMUP_OUTPUT_LEN))
                for i in range(load.warmup_requests)]
    results = await asyncio.gather(*(send_request(http, load.base_url, r, load.request_timeout_s, load.headers)
                                     for r in requests))
    if not any(r.success for r in results):
        raise WarmupFailed([r.error for r in results])
    return list(results)


async def run_load(workload: Workload, load: LoadConfig, *, warmup: bool = True,
                   description: str = "requests") -> RunResult:
    """Warm up (unless `warmup` is False), then offer every request of `workload` and time them."""
    n = len(workload)
    depth = load.prefetch or (load.max_concurrency + 16 if load.max_concurrency else 64)
    slots = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    arrivals = arrival_times(n, load.request_rate, load.seed)
    with ThreadPoolExecutor(load.build_threads, thread_name_prefix="bench-build") as executor:
        async with new_http_client() as http:
            warm = await warm_up(http, workload, load) if warmup else []
            bodies = Prefetcher(lambda i: workload.request(i, load.model), n, depth, executor)
            await bodies.fill()
            progress = tqdm(total=n, desc=description, disable=not load.progress, unit="req", leave=False)

            async def one(request: PreparedRequest) -> RequestResult:
                try:
                    return await send_request(http, load.base_url, request, load.request_timeout_s, load.headers)
                finally:
                    progress.update(1)
                    if slots:
                        slots.release()

            start = time.perf_counter()
            tasks = []
            for index in range(n):
                delay = start + arrivals[index] - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if slots:
                    await slots.acquire()
                tasks.append(asyncio.ensure_future(one(await bodies.take(index))))
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
            progress.close()
    for result in results:
        result.start -= start
    return RunResult(list(results), duration, warm)
