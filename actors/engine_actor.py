"""The engine actor in its three roles: colocated `engine` (prefill and decode in one process,
the baseline), `prefill` and `decode`.

It pulls jobs and `CancelRequest`s, runs continuous batching (requests join and leave the
running batch at any step), and pushes each step's new tokens as one `StepTokens` (a `TokenBatch`
per request that asked for logprobs). In the `prefill` role a
request leaves after its first token: the pages decode needs go out as a `KVHandoff`, and the
first token goes straight to the api (time to first token does not wait for the handoff). In
the `decode` role requests arrive as `KVHandoff`s. A request that can never fit, or is
malformed, ends at once with a `RequestError`; nothing is left waiting.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np
import zmq

from gemma4_model.engine import Engine, GenerationSequence, Status
from gemma4_model.grammar import GrammarError, GrammarSpec
from gemma4_model.kv_cache import RequestTooLargeError
from gemma4_model.page_pool import KVCacheFullError
from gemma4_model.sampling import SamplingParams
from transfer.backend import Arrival, KVReceiver, KVSender
from transfer.kv_pages import KVPayload, PayloadError, check_payload, import_pages

from .handoff import handoff_hidden, handoff_message, hidden_of
from .media_wait import MediaWaiter, handoff_media, spans_from_handoff
from .messages import (ActorStats, CancelRequest, EncodeResult, KVHandoff, PrefillJob, RequestError, SamplingSpec,
                       StepTokens, TokenBatch, encode)
from .tracing import Tracer
from .transport import Channel

ROLES = ("engine", "prefill", "decode")
MAX_REMEMBERED_CANCELS = 4096  # cancels that overtook their request (bounded: ids of gone requests age out)
WAIT_S = 0.002  # an idle decode waiting on a device transfer looks at its inbox again at least this often


def sampling_params(spec: SamplingSpec) -> SamplingParams:
    """The wire spec as the engine's params (raises ValueError for out-of-range values)."""
    fields = dict(spec.__dict__)
    fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
    fields.pop("tool_choice", None)  # a forced tool call arrives here as its grammar (preprocess builds it)
    kind, text = fields.pop("grammar_kind"), fields.pop("grammar")
    after, opener = fields.pop("grammar_after_token_id"), fields.pop("grammar_open_token_id")
    if (kind is None) != (text is None):
        raise GrammarError("grammar_kind and grammar come together")
    grammar = GrammarSpec(kind, text, after, opener) if kind is not None else None
    return SamplingParams(**fields, grammar=grammar)


def _first_batch_counts(seq: GenerationSequence) -> dict:
    """Usage counts ride on a request's first token batch only."""
    if seq.num_reported != max(1, len(seq.new_tokens)):
        return {}
    return {"prompt_tokens": len(seq.prompt), "cached_tokens": seq.num_cached_prompt_tokens}


def _logprob_fields(seq: GenerationSequence, count: int = 1) -> dict:
    """The logprobs and top alternatives of the latest `count` sampled tokens, when the request asked."""
    if seq.params.logprobs is None or not seq.logprobs:
        return {}
    return {"logprobs": [float(x) for x in seq.logprobs[-count:]], "top_ids": np.stack(seq.top_ids[-count:]),
            "top_logprobs": np.stack(seq.top_logprobs[-count:])}


class EngineActor:
    """Owns an `Engine`; fed by one PULL channel, answers on one PUSH channel."""

    def __init__(self, engine: Engine, inbox: Channel, outbox: Channel, role: str = "engine",
                 handoff: Channel | None = None, sender: KVSender | None = None,
                 receiver: KVReceiver | None = None, tracer: Tracer | None = None, replica: int = 0,
                 stats_interval_s: float = 0.5):
        """`prefill` needs a `sender` (or a `handoff` channel: pages inline to one decode);
        `decode` takes a `receiver` (default: pages inline in the `KVHandoff`)."""
        if role not in ROLES or (role == "prefill") != (handoff is not None or sender is not None):
            raise ValueError(f"role {role!r} needs a handoff channel or KV sender exactly when it is 'prefill'")
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.role = role
        self.handoff = handoff
        self.sender = sender or (KVSender([handoff]) if handoff is not None else None)
        self.receiver = receiver or (KVReceiver() if role == "decode" else None)
        self.tracer = tracer or Tracer(role, None)
        self.requests: dict[str, GenerationSequence] = {}
        self.specs: dict[str, SamplingSpec] = {}
        self.cancelled: OrderedDict[str, None] = OrderedDict()  # cancels for requests not seen yet
        self.replica = replica
        self.stats_interval_s = stats_interval_s
        self.last_stats = 0.0
        self.last_batch = 0
        self.peak_batch = 0
        self.media = MediaWaiter(engine.device, next(engine.model.parameters()).dtype)  # jobs waiting for encoders

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            idle = not self.engine.has_work()
            waiting = self.receiver is not None and self.receiver.pending()  # a handoff's other half is due
            waiting = waiting or self.media.pending() or (self.sender is not None and self.sender.pending())
            device_wait = idle and self.receiver is not None and self.receiver.on_device and self.receiver.pending()
            msg = self.inbox.recv(timeout_ms=0 if device_wait or not idle else (2 if waiting else 50))
            if msg is None and device_wait:  # a handoff on the device: look again as soon as it may be done
                self.receiver.wait(WAIT_S)
                msg = self.inbox.recv(timeout_ms=0)
            while msg is not None:  # take everything that has arrived before the next step
                self.handle(msg)
                msg = self.inbox.recv(timeout_ms=0)
            self.receive_ready()
            if self.sender is not None:  # GPU data plane: sends completing, held pages released
                self.sender.poll()
            for request_id, code, problem in self.media.expired():
                self.outbox.send(RequestError(request_id, code, problem))
            if self.engine.has_work():
                self.step()
            self.report_load()
            self.tracer.tick()

    def handle(self, msg) -> None:
        if isinstance(msg, PrefillJob) and self.role != "decode":
            if msg.request_id in self.cancelled:  # its cancel came first
                del self.cancelled[msg.request_id]
            elif msg.media_kinds:
                self.media.add_job(msg)
                self.admit_media()
            else:
                self.admit(msg)
        elif isinstance(msg, EncodeResult) and self.role != "decode":
            if msg.request_id not in self.cancelled:
                self.media.add_result(msg)
                self.admit_media()
        elif isinstance(msg, KVHandoff) and self.role == "decode":
            self.receiver.accept(msg)
            self.receive_ready()  # inline and shm pages are here at once; tcp may wait for its data
        elif isinstance(msg, CancelRequest):
            seq = self.requests.pop(msg.request_id, None)
            self.specs.pop(msg.request_id, None)
            self.media.discard(msg.request_id)
            if seq is not None:
                self.engine.cancel(seq)
            else:  # the cancel overtook its job (e.g. still in prefill): drop the job when it comes
                self.cancelled[msg.request_id] = None
                while len(self.cancelled) > MAX_REMEMBERED_CANCELS:
                    self.cancelled.popitem(last=False)
            if self.receiver is not None:  # a handoff still in flight is dropped, its data freed
                self.receiver.discard(msg.request_id)
        else:
            raise TypeError(f"engine actor got an unexpected {type(msg).__name__}")

    def admit_media(self) -> None:
        """Admit the multimodal jobs whose every media item is encoded; end those that failed."""
        for job, spans, failure in self.media.ready():
            if failure is not None:
                self.outbox.send(RequestError(job.request_id, failure[0], failure[1]))
            else:
                self.admit(job, spans)

    def admit(self, job: PrefillJob, media=()) -> None:
        if job.request_id in self.cancelled:  # its cancel came first
            del self.cancelled[job.request_id]
            return
        if job.request_id in self.requests:
            self.outbox.send(RequestError(job.request_id, 409, "a request with this id is already running"))
            return
        try:
            seq = self.engine.add_request(job.token_ids.tolist(), sampling_params(job.sampling), job.request_id,
                                          media=media)
        except RequestTooLargeError as exc:
            self.outbox.send(RequestError(job.request_id, 413, str(exc)))
            return
        except GrammarError as exc:
            self.outbox.send(RequestError(job.request_id, 400, f"response_format: {exc}", param="response_format"))
            return
        except ValueError as exc:
            self.outbox.send(RequestError(job.request_id, 400, str(exc)))
            return
        self.requests[job.request_id] = seq
        self.specs[job.request_id] = job.sampling

    def receive_ready(self) -> None:
        if self.receiver is not None:
            for arrival in self.receiver.poll():
                self.receive(arrival)

    def receive(self, arrival: Arrival) -> None:
        """A handoff whose pages are here (adopt it) or that failed in transfer (end it)."""
        if arrival.error is not None:
            self.outbox.send(RequestError(arrival.request_id, arrival.code, arrival.error))
            return
        try:
            self.adopt(arrival.handoff, arrival.payload)
        finally:
            self.receiver.imported(arrival.request_id)
        self.tracer.record("handoff_receive", arrival.since_ns, time.time_ns(), arrival.request_id,
                           bytes=arrival.nbytes, pages=arrival.pages, backend=self.receiver.backend)

    def adopt(self, msg: KVHandoff, payload: KVPayload) -> None:
        if msg.request_id in self.cancelled:  # its cancel came first
            del self.cancelled[msg.request_id]
            return
        if msg.request_id in self.requests:
            self.outbox.send(RequestError(msg.request_id, 409, "a request with this id is already running"))
            return
        try:
            params = sampling_params(msg.sampling)
            check_payload(self.engine.cache, payload, len(msg.prompt_ids))
            self.engine.cache.check_fits(len(msg.prompt_ids) + params.max_tokens, self.engine.scheduler.limits.chunk_size)
            seq = self.engine.add_prefilled(
                msg.prompt_ids.tolist(), msg.first_token, params,
                lambda cache, seq_id: import_pages(cache, seq_id, payload), msg.request_id,
                media=spans_from_handoff(msg, self.media.device, self.media.dtype),
                last_hidden=hidden_of(msg, self.engine.model.cfg.hidden_size, self.engine.device),
            )
        except PayloadError as exc:
            self.outbox.send(RequestError(msg.request_id, 502, f"bad KV handoff: {exc}"))
            return
        except RequestTooLargeError as exc:
            self.outbox.send(RequestError(msg.request_id, 413, str(exc)))
            return
        except KVCacheFullError as exc:
            self.outbox.send(RequestError(msg.request_id, 503, f"decode has no free KV pages: {exc}"))
            return
        except GrammarError as exc:
            self.outbox.send(RequestError(msg.request_id, 400, f"response_format: {exc}", param="response_format"))
            return
        except ValueError as exc:  # sampling settings out of range
            self.outbox.send(RequestError(msg.request_id, 400, str(exc)))
            return
        self.requests[msg.request_id] = seq

    def report_load(self) -> None:
        """Load figures to the api for /metrics, at most every `stats_interval_s`."""
        now = time.monotonic()
        if now - self.last_stats < self.stats_interval_s:
            return
        self.last_stats = now
        cache, scheduler = self.engine.cache, self.engine.scheduler
        counts = self.engine.stats
        stats = ActorStats(self.role, self.replica, len(scheduler.waiting), len(scheduler.running),
                           sum(cache.pages_in_use().values()), sum(g.pool.num_pages for g in cache.groups.values()),
                           self.last_batch, counts.steps, self.peak_batch, counts.drafted_tokens,
                           counts.accepted_tokens, counts.verify_runs)
        try:  # figures are disposable: never block the engine on an api that is not reading
            self.outbox.socket.send_multipart(encode(stats), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass

    def step(self) -> None:
        before = self._progress() if self.tracer.enabled else None
        counts = self.engine.stats
        drafts_before = (counts.drafted_tokens, counts.accepted_tokens, counts.verify_runs)
        start = time.time_ns()
        advanced = self.engine.step()
        self.last_batch = len(advanced)
        self.peak_batch = max(self.peak_batch, self.last_batch)
        if before is not None:
            drafts = (counts.drafted_tokens, counts.accepted_tokens, counts.verify_runs)
            self._trace_step(before, start, time.time_ns(), [b - a for a, b in zip(drafts_before, drafts)])
        plain = []  # batches of tokens without logprobs: one message for the step
        for seq in advanced:
            done = seq.status is Status.FINISHED
            if self.role == "prefill" and not done:
                self.hand_over(seq)
                continue
            # every token the step emitted (several when drafts were accepted)
            batch = TokenBatch(seq.request_id, list(seq.new_tokens), seq.finish_reason if done else None,
                               **_first_batch_counts(seq), **_logprob_fields(seq, len(seq.new_tokens)))
            if batch.logprobs is None and batch.token_ids:
                plain.append(batch)
            else:
                self.outbox.send(batch)
            if done:
                self.requests.pop(seq.request_id, None)
                self.specs.pop(seq.request_id, None)
        if plain:
            self.outbox.send(StepTokens.of(plain))

    def hand_over(self, seq: GenerationSequence) -> None:
        """First token to the api, the needed pages to decode; this actor's pages are then free."""
        start = time.time_ns()
        # a copy, send buffers, or pages held in place (the GPU data plane), per the transfer backend
        payload = self.sender.export(self.engine.cache, seq.seq_id, self.engine.scheduler.reach_back)
        self.engine.cancel(seq)
        self.requests.pop(seq.request_id, None)
        spec = self.specs.pop(seq.request_id)
        self.outbox.send(TokenBatch(seq.request_id, [seq.output[0]], None, **_first_batch_counts(seq),
                                    **_logprob_fields(seq)))
        try:
            message = handoff_message(seq.request_id, seq.prompt, seq.output[0], spec, None, **handoff_media(seq.media),
                                      **handoff_hidden(seq.last_hidden))
            report = self.sender.send(message, payload)
        except OSError as exc:  # e.g. /dev/shm full: this request fails, the actor goes on
            self.outbox.send(RequestError(seq.request_id, 503, f"KV handoff failed: {exc}"))
            return
        self.tracer.record("handoff_send", start, time.time_ns(), seq.request_id, bytes=report.nbytes,
                           pages=report.pages, replica=report.replica, backend=self.sender.backend)

    def _progress(self) -> dict[str, tuple[GenerationSequence, int, int, int]]:
        """Per request: tokens run so far (all attempts), its position in the cache, its length."""
        cache = self.engine.cache
        return {rid: (seq, seq.num_computed_tokens,
                      cache.num_computed(seq.seq_id) if cache.has_sequence(seq.seq_id) else 0, seq.num_tokens)
                for rid, seq in self.requests.items()}

    def _trace_step(self, before: dict[str, tuple[GenerationSequence, int, int, int]], start: int, end: int,
                    drafts: list[int]) -> None:
        """One span per kind of work in the step: `prefill` (prompt chunks, or a recompute after
        preemption) and `decode` (the newest token, with its drafts in a verify run), with the
        requests, their tokens and the batch; with MTP the decode span also counts the step's
        drafted and accepted tokens and verify runs (`drafts`)."""
        work: dict[str, list[tuple[str, int]]] = {"prefill": [], "decode": []}
        for rid, (seq, ran, position, length) in before.items():
            done = seq.num_computed_tokens - ran
            if done > 0:  # decode: its newest token (plus drafts, in a verify run) ran
                decoding = position >= len(seq.prompt) and position == length - 1
                work["decode" if decoding else "prefill"].append((rid, done))
        for stage, items in work.items():
            if items:
                extra = dict(zip(("drafted", "accepted", "verify_runs"), drafts)) if stage == "decode" and drafts[0] else {}
                self.tracer.record(stage, start, end, [rid for rid, _ in items], batch=len(items),
                                   tokens=sum(n for _, n in items), **extra)
