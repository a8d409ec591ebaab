"""The colocated engine actor over real ZeroMQ sockets: streaming, continuous batching,
cancellation and refusals, with the pages all freed at the end."""

import threading

import numpy as np
import pytest
import torch
import zmq

from actors.engine_actor import EngineActor
from actors.messages import (ActorStats, CancelRequest, PrefillJob, RequestError, SamplingSpec, StepTokens, TokenBatch,
                             per_request)
from actors.transport import pull, push
from gemma4_model.engine import Engine
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder


@pytest.fixture()
def actor(tiny_checkpoint):
    config, model = load_text_decoder(tiny_checkpoint("e2b"))
    cache = PagedKVCache(config.text, page_size=4, num_pages=80)
    ctx = zmq.Context()
    inbox = pull(ctx, "inproc://jobs")
    outbox = push(ctx, "inproc://tokens", bind=True)
    client_in, client_out = push(ctx, "inproc://jobs"), pull(ctx, "inproc://tokens", bind=False)
    engine = Engine(model, cache)
    stop = threading.Event()
    thread = threading.Thread(target=EngineActor(engine, inbox, outbox).run, args=(stop,))
    thread.start()
    yield engine, client_in, client_out
    stop.set()
    thread.join(timeout=10)
    for ch in (inbox, outbox, client_in, client_out):
        ch.close()
    ctx.term()


def collect(channel, until_done: set[str], timeout_ms=20_000) -> dict[str, list]:
    got: dict[str, list] = {}
    while until_done:
        msg = channel.recv(timeout_ms=timeout_ms)
        assert msg is not None, f"no answer for {until_done}"
        if isinstance(msg, ActorStats):  # load figures for /metrics, interleaved with the tokens
            continue
        for item in per_request(msg):  # a step's tokens travel as one StepTokens
            got.setdefault(item.request_id, []).append(item)
            if isinstance(item, RequestError) or item.finish_reason is not None:
                until_done.discard(item.request_id)
    return got


def job(rid, n, max_tokens=6, seed=0):
    ids = torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).numpy().astype(np.int32)
    return PrefillJob(rid, ids, SamplingSpec(max_tokens=max_tokens, ignore_eos=True))


def test_streams_tokens_for_concurrent_requests_and_matches_offline(actor):
    engine, client_in, client_out = actor
    for i in range(3):
        client_in.send(job(f"r{i}", 20 + 5 * i, seed=i))
    got = collect(client_out, {"r0", "r1", "r2"})
    for i in range(3):
        msgs = got[f"r{i}"]
        assert all(isinstance(m, TokenBatch) for m in msgs) and len(msgs) == 6
        assert [m.finish_reason for m in msgs] == [None] * 5 + ["length"]
    assert engine.stats.mixed_steps >= 0 and engine.cache.pages_in_use() == {k: 0 for k in engine.cache.groups}


def test_cancel_frees_pages_and_oversize_is_refused(actor):
    engine, client_in, client_out = actor
    client_in.send(job("long", 30, max_tokens=200))
    first = client_out.recv(timeout_ms=20_000)
    while isinstance(first, ActorStats):
        first = client_out.recv(timeout_ms=20_000)
    assert isinstance(first, StepTokens) and first.request_ids == ["long"]
    client_in.send(CancelRequest("long"))
    client_in.send(job("huge", 400, max_tokens=8))
    client_in.send(job("ok", 12, max_tokens=3))
    got = collect(client_out, {"huge", "ok"})
    assert isinstance(got["huge"][0], RequestError) and got["huge"][0].code == 413
    assert got["ok"][-1].finish_reason == "length"
    assert sum(len(m.token_ids) for m in got.get("long", [])) < 200
    assert engine.cache.pages_in_use() == {k: 0 for k in engine.cache.groups}


def test_disaggregated_prefill_and_decode_actors_give_colocated_tokens(tiny_checkpoint):
    from gemma4_model.sampling import SamplingParams

    config, model = load_text_decoder(tiny_checkpoint("e4b"))
    jobs = [job(f"d{i}", 18 + 9 * i, max_tokens=10, seed=40 + i) for i in range(3)]
    offline = Engine(model, PagedKVCache(config.text, page_size=4, num_pages=80)).generate(
        [j.token_ids.tolist() for j in jobs], SamplingParams(max_tokens=10, ignore_eos=True))

    ctx = zmq.Context()
    prefill_cache = PagedKVCache(config.text, page_size=4, num_pages=80)
    decode_cache = PagedKVCache(config.text, page_size=4, num_pages=80)
    channels = {
        "prefill_in": pull(ctx, "inproc://p-in"), "prefill_out": push(ctx, "inproc://api"),
        "kv_out": push(ctx, "inproc://kv", bind=True), "decode_in": pull(ctx, "inproc://kv", bind=False),
        "decode_out": push(ctx, "inproc://api"),
    }
    api = pull(ctx, "inproc://api")  # both actors stream to the api
    for ch in ("prefill_out", "decode_out"):
        channels[ch].socket.connect("inproc://api")
    client = push(ctx, "inproc://p-in")
    prefill = EngineActor(Engine(model, prefill_cache), channels["prefill_in"], channels["prefill_out"],
                          role="prefill", handoff=channels["kv_out"])
    decode = EngineActor(Engine(model, decode_cache), channels["decode_in"], channels["decode_out"], role="decode")
    stop = threading.Event()
    threads = [threading.Thread(target=a.run, args=(stop,)) for a in (prefill, decode)]
    for t in threads:
        t.start()
    try:
        for j in jobs:
            client.send(j)
        got = collect(api, {j.request_id for j in jobs})
        for j, seq in zip(jobs, offline):
            tokens = [t for m in got[j.request_id] for t in m.token_ids]
            assert tokens == seq.output and got[j.request_id][-1].finish_reason == "length"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        for ch in [*channels.values(), api, client]:
            ch.close()
        ctx.term()
    assert prefill_cache.pages_in_use() == {k: 0 for k in prefill_cache.groups}
    assert decode_cache.pages_in_use() == {k: 0 for k in decode_cache.groups}


def test_a_cancel_that_overtakes_its_job_drops_the_job(actor):
    engine, client_in, client_out = actor
    client_in.send(CancelRequest("early"))  # e.g. the client left while preprocess still held it
    client_in.send(job("early", 10, max_tokens=50))
    client_in.send(job("ok", 12, max_tokens=3))
    got = collect(client_out, {"ok"})
    assert "early" not in got and got["ok"][-1].finish_reason == "length"
    assert engine.cache.pages_in_use() == {k: 0 for k in engine.cache.groups}


def test_load_reports_reach_the_outbox(actor):
    engine, client_in, client_out = actor
    client_in.send(job("s", 10, max_tokens=2))
    stats = None
    deadline_msgs = 50
    while deadline_msgs and stats is None:
        msg = client_out.recv(timeout_ms=5000)
        assert msg is not None
        stats = msg if isinstance(msg, ActorStats) else None
        deadline_msgs -= 1
    assert stats is not None and (stats.actor, stats.replica) == ("engine", 0)
    assert stats.kv_pages_total == sum(g.pool.num_pages for g in engine.cache.groups.values())
    collect(client_out, {"s"})
