"""Supervision under load: `kill -9` of each actor kind in turn while 32 clients stream.

`tandem serve --topology cpu_disaggregated` (preprocess, vision and audio encoders, prefill,
decode, and last the api itself). Every request completes or ends with a clear error (an OpenAI
error object, in the stream or as the status; while the api is down, its dropped connection);
none hangs; requests caught before they streamed are sent again
(`tandem_requests_retried`); within 10 s of each restart requests complete again; and once
the load stops, no KV page is in use and the api holds no request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving import Served
from topology.config import EXAMPLES, load_topology

CLIENTS = 32
REQUEST_DEADLINE_S = 90
KILLED = ("preprocess", "prefill", "decode", "vision_encoder", "audio_encoder", "api")
BODY = {"model": "tandem-default", "messages": [{"role": "user", "content": "Copy: river stone lantern"}],
        "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """(directory for the run's files, run directories and shm segments that existed before it)."""
    return (tmp_path_factory.mktemp("supervision"), set(Path("/tmp").glob("tandem-*")),
            set(Path("/dev/shm").glob("tandem-*")))


@pytest.fixture(scope="module")
def server(work):
    """cpu_disaggregated with one torch thread per actor (five processes on a small machine),
    tracing to `work/traces`."""
    work = work[0]
    text = (EXAMPLES / "cpu_disaggregated.toml").read_text()
    topology = work / "topology.toml"
    topology.write_text(re.sub(r'(\[\[actors\]\]\nkind = "(prefill|decode|vision_encoder|audio_encoder)"\n)',
                               r"\1threads = 1\n", text))
    assert load_topology(topology).actor("decode").threads == 1
    with Served(["serve", "--topology", str(topology), "--trace-dir", str(work / "traces")],
                log=work / "serve.log") as served:
        yield served


def media_bodies(count: int = 2) -> list[dict]:
    """Image and audio tasks of the default model as streamed chat bodies; each call's pixels and
    samples are nudged at random so the encoders work on every request (no cache hit)."""
    from default_model.tasks import make_set
    from tests.test_multimodal_serve import openai_messages

    rng = np.random.default_rng()
    bodies = []
    for inst in make_set(int(rng.integers(1 << 30)), count, heldout=True, kinds=("colour", "tone")):
        if inst.image is not None:
            inst = dataclasses.replace(inst, image=np.clip(inst.image.astype(int) + rng.integers(-3, 4, inst.image.shape),
                                                           0, 255).astype(np.uint8))
        if inst.audio is not None:
            inst = dataclasses.replace(inst, audio=inst.audio + rng.normal(0, 1e-3, inst.audio.shape))
        bodies.append({**BODY, "messages": openai_messages(inst)})
    return bodies


async def stream_once(client: httpx.AsyncClient, url: str, body: dict = BODY) -> tuple[str, float, float]:
    """(outcome, start, end): `ok` (tokens then [DONE]), `error:<message>` (a clear error), or
    `hang` / `unclear:<what>` (failures of this test)."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(REQUEST_DEADLINE_S):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    body = json.loads(await reply.aread())
                    return f"error:{body['error']['message']}", start, time.monotonic()
                async for line in reply.aiter_lines():
                    if line == "data: [DONE]":
                        return "ok", start, time.monotonic()
                    if line.startswith("data: ") and '"error"' in line:
                        return f"error:{json.loads(line[6:])['error']['message']}", start, time.monotonic()
                return "unclear:stream ended without [DONE] or an error", start, time.monotonic()
    except TimeoutError:
        return "hang", start, time.monotonic()
    except httpx.TransportError as exc:  # the connection dropped: clear only while the api is down
        return f"connection:{type(exc).__name__}", start, time.monotonic()
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return f"unclear:{type(exc).__name__}: {exc}", start, time.monotonic()


def metric(text: str, name: str) -> list[float]:
    return [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]


async def load_and_kill(server: Served) -> tuple[list, list, list[float]]:
    results: list[tuple[str, float, float]] = []
    kills: list[tuple[str, float, float]] = []  # (kind, killed at, healthy again at)
    retried: list[float] = []  # the api's retry count before it is killed
    stop = asyncio.Event()

    async def client_loop(index: int) -> None:
        async with httpx.AsyncClient(timeout=None) as client:
            while not stop.is_set():  # a quarter of the clients send images and audio: the encoders work
                body = media_bodies(2)[index % 2] if index % 4 == 0 else BODY
                results.append(await stream_once(client, server.url, body))
                if results[-1][0].startswith("connection:"):
                    await asyncio.sleep(0.2)  # the api is down: try again shortly

    async def killer() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            await asyncio.sleep(2)
            for kind in KILLED:
                if kind == "api":  # its counters die with it: read them first
                    retried.extend(metric((await client.get(f"{server.url}/metrics")).text,
                                          "tandem_requests_retried_total"))
                pid = server.actor_process(kind).pid
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                await asyncio.sleep(0.5)
                while True:  # the launcher restarts it; /health is 200 again once it is ready
                    try:
                        if (await client.get(f"{server.url}/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.monotonic() - killed < 60, f"{kind} not back within 60 s"
                    await asyncio.sleep(0.2)
                kills.append((kind, killed, time.monotonic()))
                await asyncio.sleep(1.5)  # load runs on the restarted actor
        stop.set()

    clients = [asyncio.create_task(client_loop(i)) for i in range(CLIENTS)]
    await killer()
    await asyncio.gather(*clients)
    return results, kills, retried


def test_kill_each_actor_kind_under_load(server):
    results, kills, retried = asyncio.run(load_and_kill(server))
    outcomes = [r[0] for r in results]
    assert [k for k, _, _ in kills] == list(KILLED)
    bad = [o for o in outcomes if o == "hang" or o.startswith("unclear")]
    assert not bad, bad[:5]
    # the api's own death drops its clients' connections (nothing behind it can answer them); a
    # dropped connection at any other time would be a failure
    _, api_killed, api_back = kills[-1]
    dropped = [(start, end) for o, start, end in results if o.startswith("connection:")]
    assert all(api_killed - 0.5 <= end <= api_back + 1 for _, end in dropped), (api_killed, api_back, dropped[:3])
    outcomes = [o for o in outcomes if not o.startswith("connection:")]
    assert all(o == "ok" or o.startswith("error:request aborted") or o.startswith("error:") for o in outcomes)
    for kind, killed, back in kills:  # completions resume within 10 s of the restart, new requests complete
        resumed = [end for o, start, end in results if o == "ok" and end > back]
        print(f"{kind}: back {back - killed:.1f} s after the kill, completions {min(resumed, default=back) - back:.1f} s later")
        assert resumed and min(resumed) - back < 10, (kind, round(back - killed, 1), round(min(resumed) - back, 1))
        assert any(o == "ok" and start >= back for o, start, _ in results), kind
    assert retried and retried[0] >= 1  # caught before streaming: sent again
    in_flight_at_kill = [o for o, start, end in results if o == "ok" and any(start < k < end for _, k, _ in kills)]
    assert in_flight_at_kill  # a request in flight at a kill still completed
    deadline = time.monotonic() + 15  # idle again: the actors report every few tenths of a second
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        if not any(metric(metrics, "tandem_kv_pages_used")) and metric(metrics, "tandem_api_requests_in_flight") == [0]:
            break
        time.sleep(0.3)
    assert not any(metric(metrics, "tandem_kv_pages_used")), metrics
    assert metric(metrics, "tandem_api_requests_in_flight") == [0]
    assert httpx.post(f"{server.url}/v1/chat/completions", json={**BODY, "stream": False}, timeout=60).status_code == 200


def test_sigterm_then_leaves_no_process_socket_or_shared_memory(server, work):
    """After the kills and restarts: SIGTERM stops every process of the run (`Served.stop` checks
    none outlives the launcher), removes its run directory and shared memory, and merges the
    actors' spans into one Chrome trace."""
    work, runs_before, shm_before = work
    run_dirs = {p for p in Path("/tmp").glob("tandem-*") if p.is_dir()} - runs_before
    assert len(run_dirs) == 1, run_dirs
    assert server.stop() == 0
    assert not any(p.exists() for p in run_dirs)
    assert set(Path("/dev/shm").glob("tandem-*")) <= shm_before
    trace = next((work / "traces").glob("trace-*.json"))  # merged by the launcher at stop
    events = json.loads(trace.read_text())["traceEvents"]
    tracks = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    with_spans = {tracks[e["pid"]] for e in events if e.get("ph") == "X"}
    assert {"api-0", "preprocess-0", "prefill-0", "decode-0"} <= with_spans, with_spans
