"""The backend alone, against bare sockets standing in for the actors: routing, cancel
broadcast, the in-flight bound, and that fail_all and close end every waiter at once."""

import asyncio
import contextlib

import pytest
import zmq

from actors.messages import (ActorStats, CancelRequest, GenerateRequest, RequestError, SamplingSpec, StepTokens,
                             TokenBatch)
from actors.transport import pull, push
from api.backend import ZmqBackend
from api.errors import ApiError


def request(rid):
    return GenerateRequest(rid, '{"messages": [{"role": "user", "content": "x"}]}', SamplingSpec())


@contextlib.contextmanager
def wiring(tmp_path, **backend_options):
    """A started backend and bare sockets for preprocess, an engine and an actor's results."""
    ctx = zmq.Context()
    ends = {n: f"ipc://{tmp_path}/{n}" for n in ("pre", "results", "engine")}
    preprocess, engine = pull(ctx, ends["pre"]), pull(ctx, ends["engine"])
    backend = ZmqBackend([ends["pre"]], ends["results"], [ends["engine"]], **backend_options)
    backend.start()
    actor_out = push(ctx, ends["results"])
    try:
        yield backend, preprocess, engine, actor_out
    finally:
        backend.close()
        for ch in (preprocess, engine, actor_out):
            ch.close()
        ctx.term()


@pytest.fixture()
def wired(tmp_path):
    with wiring(tmp_path, max_in_flight=2) as parts:
        yield parts


def test_routes_results_and_stats(wired):
    backend, preprocess, _, actor_out = wired

    async def run():
        stream = backend.submit(request("a"))
        assert preprocess.recv(timeout_ms=2000).request_id == "a"
        actor_out.send(ActorStats("engine", 0, 1, 2, 3, 4, 5, 6))
        actor_out.send(TokenBatch("zzz", [1]))  # unknown request: dropped
        actor_out.send(TokenBatch("a", [5], None, prompt_tokens=4))
        actor_out.send(TokenBatch("a", [6], "length"))
        got = [m async for m in stream]
        assert [m.token_ids for m in got] == [[5], [6]] and got[0].prompt_tokens == 4
        assert backend.in_flight == 0

    asyncio.run(asyncio.wait_for(run(), 5))
    assert backend.actor_stats() == [ActorStats("engine", 0, 1, 2, 3, 4, 5, 6)]


def test_one_step_message_reaches_every_stream(tmp_path):
    """A StepTokens carries a step's tokens for several requests: each stream gets its own, in
    order, finishing where its reason is set; a request it names that is not running is dropped."""
    with wiring(tmp_path) as (backend, preprocess, _, actor_out):
        async def run():
            streams = {rid: backend.submit(request(rid)) for rid in ("a", "b", "c")}
            for _ in streams:
                preprocess.recv(timeout_ms=2000)
            actor_out.send(StepTokens(["a", "b", "gone", "c"], [1, 1, 1, 2], [5, 7, 0, 9, 10], [None, "stop", None, None],
                                      [3, 4, None, 5], [0, 0, None, 2]))
            actor_out.send(StepTokens(["a", "c"], [1, 1], [6, 11], ["length", "length"], [None, None], [None, None]))
            got = {rid: [m async for m in s] for rid, s in streams.items()}
            assert {rid: [m.token_ids for m in ms] for rid, ms in got.items()} == {
                "a": [[5], [6]], "b": [[7]], "c": [[9, 10], [11]]}
            assert [m.finish_reason for m in got["c"]] == [None, "length"] and got["c"][0].cached_tokens == 2
            assert backend.in_flight == 0

        asyncio.run(asyncio.wait_for(run(), 5))


def test_bound_cancel_and_fail_all(wired):
    backend, _, engine, _ = wired

    async def run():
        a, b = backend.submit(request("a")), backend.submit(request("b"))
        with pytest.raises(ApiError) as info:
            backend.submit(request("c"))
        assert info.value.status == 429
        backend.cancel("a")
        assert engine.recv(timeout_ms=2000) == CancelRequest("a")
        waiter = asyncio.create_task(b.next())
        await asyncio.sleep(0.05)
        backend.fail_all(503, "decode-0 died")  # as the launcher's notice thread would
        msg = await asyncio.wait_for(waiter, 2)
        assert isinstance(msg, RequestError) and msg.code == 503 and "decode-0" in msg.message
        assert engine.recv(timeout_ms=2000) == CancelRequest("b")  # survivors free its pages
        backend.submit(request("d"))  # room again

    asyncio.run(asyncio.wait_for(run(), 5))


def test_close_ends_waiters_and_health(wired):
    backend = wired[0]
    backend.set_health(False, "decode-0 down")
    assert backend.health() == (False, "decode-0 down")
    backend.set_health(True, "ok")

    async def run():
        stream = backend.submit(request("a"))
        waiter = asyncio.create_task(stream.next())
        await asyncio.sleep(0.05)
        backend.close()
        msg = await asyncio.wait_for(waiter, 2)
        assert isinstance(msg, RequestError) and msg.code == 503
        with pytest.raises(ApiError):
            backend.submit(request("b"))

    asyncio.run(asyncio.wait_for(run(), 5))
    assert backend.health()[0] is False


def test_actor_death_resends_what_has_not_streamed(tmp_path):
    """Three requests in flight when decode dies: the one that has streamed ends with a 503 naming
    it; the others are cancelled under their old ids and sent again under new ones, whose results
    reach the client's streams (under the client's ids) while the old attempts' are dropped.
    A request past a dead preprocess goes on; after `max_retries` re-sends a request fails."""
    async def run(backend, preprocess, engine, actor_out):
        streams = {rid: backend.submit(request(rid)) for rid in ("a", "b", "c")}
        assert sorted(preprocess.recv(timeout_ms=2000).request_id for _ in range(3)) == ["a", "b", "c"]
        actor_out.send(TokenBatch("a", [5]))
        assert (await asyncio.wait_for(streams["a"].next(), 2)).token_ids == [5]
        backend.actor_down("decode", 0, "decode-0 died (exit -9)")
        error = await asyncio.wait_for(streams["a"].next(), 2)
        assert isinstance(error, RequestError) and error.code == 503 and "decode-0" in error.message
        assert sorted(engine.recv(timeout_ms=2000).request_id for _ in range(3)) == ["a", "b", "c"]  # cancels
        assert sorted(preprocess.recv(timeout_ms=2000).request_id for _ in range(2)) == ["b.retry1", "c.retry1"]
        assert backend.retried == 2 and backend.in_flight == 2
        actor_out.send(TokenBatch("b", [1], "length"))  # the old attempt: dropped
        actor_out.send(TokenBatch("b.retry1", [7]))
        actor_out.send(TokenBatch("b.retry1", [8], "length"))
        got = [m async for m in streams["b"]]
        assert [m.token_ids for m in got] == [[7], [8]] and {m.request_id for m in got} == {"b"}
        actor_out.send(TokenBatch("c.retry1", [9]))
        assert (await asyncio.wait_for(streams["c"].next(), 2)).token_ids == [9]
        backend.actor_down("preprocess", 0, "preprocess-0 died")  # c has streamed: past preprocess
        assert backend.in_flight == 1
        backend.actor_down("engine", 0, "engine-0 died")  # c has streamed and was at the engine
        assert isinstance(await asyncio.wait_for(streams["c"].next(), 2), RequestError)
        d = backend.submit(request("d"))
        preprocess.recv(timeout_ms=2000)
        backend.actor_down("engine", 0, "engine-0 died")  # d: re-sent once
        backend.actor_down("engine", 0, "engine-0 died again")  # past max_retries: fails
        assert isinstance(await asyncio.wait_for(d.next(), 2), RequestError) and backend.retried == 3
        assert backend.in_flight == 0

    with wiring(tmp_path, max_retries=1) as parts:
        asyncio.run(asyncio.wait_for(run(*parts), 10))
