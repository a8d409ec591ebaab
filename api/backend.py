"""The api's ZeroMQ side: requests out to preprocess, every actor's results in, cancels out.

- one PUSH connected to every preprocess replica (ZeroMQ deals requests round-robin);
- the results PULL, bound here: `TokenBatch`, `RequestError` and `ActorStats` from every actor;
- one PUSH per engine / prefill / decode inbox, to broadcast `CancelRequest`s.

A receiver thread routes each result to its request's `RequestStream`, an asyncio queue on the
event loop that submitted it. Nothing waits forever: `fail_all` and `close` end every stream in
flight with an error at once, and a full table of in-flight requests refuses new ones (429).
Sockets are used under one lock, so any thread may submit, cancel or fail requests.

Supervision (`actor_down`): when the launcher reports an actor dead, a request that has streamed
nothing yet is sent again under a fresh attempt id (its old attempt cancelled everywhere, so no
survivor keeps its pages; results of the old attempt are dropped), at most `max_retries` times;
one that has streamed, and could have been at the dead actor, ends with a 503 naming it. A
request past the stages of the dead actor (it has streamed, and the dead actor prepares
requests: preprocess, an encoder, prefill) goes on untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Sequence

import zmq

from actors.messages import (ActorStats, CancelRequest, GenerateRequest, MessageError, RequestError, TokenBatch,
                             decode, encode, per_request)
from actors.security import secure_socket
from actors.transport import MAX_MESSAGE_BYTES

from .errors import ApiError

log = logging.getLogger("tandem.api")
UPSTREAM_KINDS = ("preprocess", "vision_encoder", "audio_encoder", "prefill")  # done with a request once it streams


class RequestStream:
    """The results of one request, in order; iteration ends after its last batch or an error."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False  # set by the consumer once it has seen the final message

    def deliver(self, msg: TokenBatch | RequestError) -> None:
        """From any thread."""
        deliver_all([(self, msg)])

    async def next(self, timeout_s: float | None = None) -> TokenBatch | RequestError:
        if timeout_s is None:
            msg = await self.queue.get()
        else:
            msg = await asyncio.wait_for(self.queue.get(), timeout_s)
        if isinstance(msg, RequestError) or msg.finish_reason is not None:
            self.done = True
        return msg

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenBatch | RequestError:
        if self.done:
            raise StopAsyncIteration
        return await self.next()


def deliver_all(deliveries: list[tuple[RequestStream, TokenBatch | RequestError]]) -> None:
    """Queue each message on its stream, from any thread: one wake-up of each event loop for
    all of them (a step's tokens for a hundred requests arrive together)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, msg in deliveries:
        by_loop.setdefault(stream.loop, []).append((stream.queue, msg))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _put_all(items: list[tuple[asyncio.Queue, TokenBatch | RequestError]]) -> None:
    for queue, msg in items:
        queue.put_nowait(msg)


class ZmqBackend:
    """Submit `GenerateRequest`s and stream their results; see the module docstring."""

    def __init__(self, requests_endpoints: Sequence[str], results_endpoint: str, cancel_endpoints: Sequence[str],
                 *, max_in_flight: int = 1024, context: zmq.Context | None = None, max_retries: int = 2):
        if not requests_endpoints:
            raise ValueError("the backend needs at least one preprocess endpoint")
        self.requests_endpoints = list(requests_endpoints)
        self.results_endpoint = results_endpoint
        self.cancel_endpoints = list(cancel_endpoints)
        self.max_in_flight = max_in_flight  # admission: more get a 429 with Retry-After
        self.max_retries = max_retries  # re-sends of a request an actor death caught before it streamed
        self.retried = 0  # requests sent again after an actor died
        self._requests_sent: dict[str, GenerateRequest] = {}  # client id -> the request, for re-sending
        self._attempt: dict[str, str] = {}  # client id -> the id its current attempt travels under
        self._client_of: dict[str, str] = {}  # attempt id -> client id
        self._tries: dict[str, int] = {}  # client id -> attempts so far
        self._streamed: set[str] = set()  # client ids that have had a result
        self._own_context = context is None
        self._zctx = context or zmq.Context()
        self._lock = threading.Lock()  # guards the sockets and the tables below
        self._streams: dict[str, RequestStream] = {}
        self._stats: dict[tuple[str, int], ActorStats] = {}
        self._health = (True, "ok")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._requests = self._results = None
        self._cancels: list[zmq.Socket] = []

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and connect the sockets and start the receiver (idempotent)."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._results = self._socket(zmq.PULL, [self.results_endpoint], server=True)
            self._results.bind(self.results_endpoint)
            self._requests = self._socket(zmq.PUSH, self.requests_endpoints, server=False)
            for endpoint in self.requests_endpoints:
                self._requests.connect(endpoint)
            for endpoint in self.cancel_endpoints:
                sock = self._socket(zmq.PUSH, [endpoint], server=False)
                sock.connect(endpoint)
                self._cancels.append(sock)
            self._thread = threading.Thread(target=self._receive, name="api-results", daemon=True)
            self._thread.start()

    def _socket(self, kind: int, endpoints: Sequence[str], server: bool) -> zmq.Socket:
        sock = self._zctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        tcp = next((e for e in endpoints if e.startswith("tcp://")), None)
        if tcp is not None:  # CURVE when the context carries the topology's keys
            secure_socket(self._zctx, sock, tcp, server)
        return sock

    def close(self) -> None:
        """End every request in flight (503), stop the receiver and close the sockets (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.fail_all(503, "the server is shutting down")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for sock in [self._requests, self._results, *self._cancels]:
                if sock is not None:
                    sock.close(linger=0)
        if self._own_context:
            self._zctx.term()

    # --- requests -------------------------------------------------------------------------
    def submit(self, request: GenerateRequest) -> RequestStream:
        """Send a request on; its results arrive on the returned stream. Call from the event loop.

        Raises `ApiError` 503 when the backend is down or the pipeline refuses it, 429 when the
        table of in-flight requests is full.
        """
        stream = RequestStream(request.request_id, asyncio.get_running_loop())
        frames = encode(request)  # before the table: a request that cannot travel must not stay in it
        with self._lock:
            if self._closed or self._thread is None:
                raise ApiError(503, "the server is not accepting requests")
            if len(self._streams) >= self.max_in_flight:
                raise ApiError(429, f"the server is at capacity ({self.max_in_flight} requests in flight); "
                                    "retry later")
            if request.request_id in self._streams:
                raise ApiError(409, f"request id {request.request_id!r} is already in flight")
            self._streams[request.request_id] = stream
            try:
                self._requests.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                del self._streams[request.request_id]
                raise ApiError(503, "the preprocess queue is full; retry later") from None
            rid = request.request_id
            self._requests_sent[rid], self._attempt[rid], self._client_of[rid], self._tries[rid] = request, rid, rid, 1
        return stream

    def _forget(self, client: str) -> None:
        """Drop a request's supervision records (it ended, failed or was cancelled)."""
        self._requests_sent.pop(client, None)
        self._tries.pop(client, None)
        self._streamed.discard(client)
        attempt = self._attempt.pop(client, None)
        if attempt is not None:
            self._client_of.pop(attempt, None)

    def actor_down(self, kind: str, replica: int, detail: str) -> None:
        """An actor died (the launcher restarts it): send again the requests that have streamed
        nothing, end those that have and could have been at it (from any thread)."""
        failed = []
        with self._lock:
            for client in list(self._streams):
                streamed = client in self._streamed
                if streamed and kind in UPSTREAM_KINDS:
                    continue  # past the dead actor's stage
                old = self._attempt[client]
                self._send_cancel(old)  # no survivor keeps the old attempt's pages or cache entries
                if streamed or self._tries[client] > self.max_retries or not self._resend(client):
                    failed.append(self._streams.pop(client))
                    self._forget(client)
        why = f"{detail}; the request had begun streaming" if failed else detail
        for stream in failed:
            stream.deliver(RequestError(stream.request_id, 503, f"request aborted: {why}"))

    def _resend(self, client: str) -> bool:
        """The request again, under a fresh attempt id (results of the old one are dropped)."""
        self._client_of.pop(self._attempt[client], None)
        self._tries[client] += 1
        attempt = f"{client}.retry{self._tries[client] - 1}"
        request = dataclasses.replace(self._requests_sent[client], request_id=attempt)
        try:
            self._requests.send_multipart(encode(request), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self._attempt[client], self._client_of[attempt] = attempt, client
        self.retried += 1
        return True

    def cancel(self, request_id: str) -> None:
        """Forget the request and tell every engine to drop it (and free its pages)."""
        with self._lock:
            if self._streams.pop(request_id, None) is not None:
                self._send_cancel(self._attempt.get(request_id, request_id))
                self._forget(request_id)

    def _send_cancel(self, request_id: str) -> None:
        if self._closed or self._thread is None:
            return
        frames = encode(CancelRequest(request_id))
        for sock in self._cancels:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                log.warning("cancel of %s not delivered: an engine inbox is full", request_id)

    def finished(self, request_id: str) -> None:
        """The request ended normally: stop routing to it (no cancel needed)."""
        with self._lock:
            self._streams.pop(request_id, None)
            self._forget(request_id)

    def fail_all(self, status: int, message: str) -> None:
        """End every request in flight now with this error (from any thread); the actors still
        alive are told to drop them, so their pages come free."""
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            for stream in streams:
                self._send_cancel(self._attempt.get(stream.request_id, stream.request_id))
                self._forget(stream.request_id)
        for stream in streams:
            stream.deliver(RequestError(stream.request_id, status, message))

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    # --- health and load ------------------------------------------------------------------
    def set_health(self, ok: bool, detail: str) -> None:
        self._health = (ok, detail)

    def health(self) -> tuple[bool, str]:
        if self._closed or self._thread is None:
            return False, "backend not running"
        return self._health

    def actor_stats(self) -> list[ActorStats]:
        """The latest figures of every actor that has reported."""
        with self._lock:
            return list(self._stats.values())

    # --- the receiver thread --------------------------------------------------------------
    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._results, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            while True:
                try:
                    frames = self._results.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    return  # socket closed under us at shutdown
                try:
                    msg = decode([f.buffer for f in frames])
                except MessageError as exc:
                    log.warning("dropped a malformed result message: %s", exc)
                    continue
                if isinstance(msg, ActorStats):
                    with self._lock:
                        self._stats[(msg.actor, msg.replica)] = msg
                    continue
                with self._lock:
                    deliveries = [d for item in per_request(msg) if (d := self._route(item)) is not None]
                deliver_all(deliveries)

    def _route(self, msg) -> tuple[RequestStream, TokenBatch | RequestError] | None:
        """The stream a request's result goes to (under the lock), or None: results of cancelled
        or failed requests are dropped."""
        if not isinstance(msg, (TokenBatch, RequestError)):
            log.warning("unexpected %s on the results socket", type(msg).__name__)
            return None
        client = self._client_of.get(msg.request_id)  # None: a cancelled, failed or superseded attempt
        final = isinstance(msg, RequestError) or msg.finish_reason is not None
        stream = None if client is None else self._streams.pop(client, None) if final else self._streams.get(client)
        if stream is None:
            return None
        self._streamed.add(client)
        if final:
            self._forget(client)
        return stream, msg if msg.request_id == client else dataclasses.replace(msg, request_id=client)
