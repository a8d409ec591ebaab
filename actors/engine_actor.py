"""The colocated engine actor: prefill and decode in one process (the baseline topology).

Pulls `PrefillJob`s and `CancelRequest`s, runs continuous batching (requests join and leave
the running batch at any step), and pushes each step's new tokens as `TokenBatch`es. A request
that can never fit, or is malformed, ends at once with a `RequestError`; nothing is left waiting.
"""

from __future__ import annotations

import threading

from gemma4_model.engine import Engine, GenerationSequence, Status
from gemma4_model.kv_cache import RequestTooLargeError
from gemma4_model.sampling import SamplingParams

from .messages import CancelRequest, PrefillJob, RequestError, SamplingSpec, TokenBatch
from .transport import Channel


def sampling_params(spec: SamplingSpec) -> SamplingParams:
    return SamplingParams(
        max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
        seed=spec.seed, stop_token_ids=tuple(spec.stop_token_ids), ignore_eos=spec.ignore_eos,
    )


class EngineActor:
    """Owns an `Engine`; fed by one PULL channel, answers on one PUSH channel."""

    def __init__(self, engine: Engine, inbox: Channel, outbox: Channel):
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.requests: dict[str, GenerationSequence] = {}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            idle = not self.engine.scheduler.has_work()
            msg = self.inbox.recv(timeout_ms=50 if idle else 0)
            while msg is not None:  # take everything that has arrived before the next step
                self.handle(msg)
                msg = self.inbox.recv(timeout_ms=0)
            if self.engine.scheduler.has_work():
                self.step()

    def handle(self, msg) -> None:
        if isinstance(msg, PrefillJob):
            self.admit(msg)
        elif isinstance(msg, CancelRequest):
            seq = self.requests.pop(msg.request_id, None)
            if seq is not None:
                self.engine.cancel(seq)
        else:
            raise TypeError(f"engine actor got an unexpected {type(msg).__name__}")

    def admit(self, job: PrefillJob) -> None:
        if job.request_id in self.requests:
            self.outbox.send(RequestError(job.request_id, 409, "a request with this id is already running"))
            return
        try:
            seq = self.engine.add_request(job.token_ids.tolist(), sampling_params(job.sampling), job.request_id)
        except RequestTooLargeError as exc:
            self.outbox.send(RequestError(job.request_id, 413, str(exc)))
            return
        except ValueError as exc:
            self.outbox.send(RequestError(job.request_id, 400, str(exc)))
            return
        self.requests[job.request_id] = seq

    def step(self) -> None:
        for seq in self.engine.step():
            done = seq.status is Status.FINISHED
            self.outbox.send(TokenBatch(seq.request_id, [seq.output[-1]], seq.finish_reason if done else None))
            if done:
                self.requests.pop(seq.request_id, None)
