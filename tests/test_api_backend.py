"""The backend alone, against bare sockets standing in for the actors: routing, cancel
broadcast, the in-flight bound, and that fail_all and close end every waiter at once."""

import asyncio

import pytest
import zmq

from actors.messages import ActorStats, CancelRequest, GenerateRequest, RequestError, SamplingSpec, TokenBatch
from actors.transport import pull, push
from api.backend import ZmqBackend
from api.errors import ApiError


def request(rid):
    return GenerateRequest(rid, '{"messages": [{"role": "user", "content": "x"}]}', SamplingSpec())


@pytest.fixture()
def wired(tmp_path):
    ctx = zmq.Context()
    ends = {n: f"ipc://{tmp_path}/{n}" for n in ("pre", "results", "engine")}
    preprocess, engine = pull(ctx, ends["pre"]), pull(ctx, ends["engine"])
    backend = ZmqBackend([ends["pre"]], ends["results"], [ends["engine"]], max_in_flight=2)
    backend.start()
    actor_out = push(ctx, ends["results"])
    yield backend, preprocess, engine, actor_out
    backend.close()
    for ch in (preprocess, engine, actor_out):
        ch.close()
    ctx.term()


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
