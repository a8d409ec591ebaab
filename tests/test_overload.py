"""Overload: at twice the rate the server sustains, admitted requests keep their latency and the
rest are refused at once (429 with Retry-After); afterwards the server is healthy and idle.

`tandem serve` (CPU, the embedded model) with `--max-running-requests 2 --max-queued-requests 2`,
so the api admits 4 requests at a time and saturation is cheap to reach.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from tests.serving import Served

MAX_TOKENS = 8
BODY = {"model": "tandem-default", "messages": [{"role": "user", "content": "Copy: river stone lantern moss"}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("overload") / "serve.log"
    with Served(["serve", "--max-running-requests", "2", "--max-queued-requests", "2"], log=log) as served:
        yield served


async def one(client: httpx.AsyncClient, url: str) -> tuple[int, float, str | None]:
    t0 = time.perf_counter()
    reply = await client.post(f"{url}/v1/chat/completions", json=BODY, timeout=120)
    return reply.status_code, time.perf_counter() - t0, reply.headers.get("retry-after")


async def at_capacity(url: str, rounds: int = 3) -> list[float]:
    """Latencies of requests sent 4 at a time (the admission limit), one round after another."""
    latencies = []
    async with httpx.AsyncClient() as client:
        for _ in range(rounds):
            results = await asyncio.gather(*(one(client, url) for _ in range(4)))
            assert all(code == 200 for code, _, _ in results), results
            latencies += [t for _, t, _ in results]
    return latencies


async def at_rate(url: str, rate: float, duration_s: float) -> list[tuple[int, float, str | None]]:
    """Requests at a steady `rate` per second for `duration_s`, each awaited on its own."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=200)) as client:
        tasks, start = [], time.perf_counter()
        for i in range(int(rate * duration_s)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, url)))
        return await asyncio.gather(*tasks)


def test_twice_the_sustainable_rate(server):
    asyncio.run(at_capacity(server.url, rounds=1))  # warm-up
    baseline = asyncio.run(at_capacity(server.url, rounds=2))
    sustainable = 4 / max(baseline)  # requests per second at the admission limit
    results = asyncio.run(at_rate(server.url, 2 * sustainable, duration_s=max(4.0, 8 / sustainable)))
    admitted = [t for code, t, _ in results if code == 200]
    refused = [(t, retry) for code, t, retry in results if code == 429]
    assert len(admitted) + len(refused) == len(results), [code for code, _, _ in results]  # nothing else
    assert len(admitted) >= 4 and refused
    # admitted requests keep the latency they have at capacity: bounded (no queue building up over
    # the run), with slack for 2 shared cores
    assert max(admitted) <= 2.0 * max(baseline) + 0.5, (baseline, admitted)
    third = max(1, len(admitted) // 3)
    assert statistics.median(admitted[-third:]) <= 1.5 * statistics.median(admitted[:third]) + 0.3, admitted
    # the rest are refused at once, told when to come back
    assert all(retry is not None and int(retry) >= 1 for _, retry in refused)
    assert statistics.median(t for t, _ in refused) < 0.1 and max(t for t, _ in refused) < 0.5, refused
    # afterwards: healthy, and nothing left in flight
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        if "tandem_api_requests_in_flight 0.0" in metrics:
            break
        time.sleep(0.2)
    assert "tandem_api_requests_in_flight 0.0" in metrics
    assert httpx.post(f"{server.url}/v1/chat/completions", json=BODY, timeout=60).status_code == 200
