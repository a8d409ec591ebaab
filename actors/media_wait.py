"""Multimodal jobs at the prefill side: waiting for their encoders, then their media spans.

A `PrefillJob` with media and its items' `EncodeResult`s come from different actors, in either
order. `MediaWaiter` holds both (results that overtook their job for a while, bounded) until a
job has every item; it then cuts each item's embeddings into the job's placeholder runs as
`MediaSpan`s. A failed item ends its request with the encoder's message; a job that waits past
`timeout_s` ends with a 504. The same spans travel on to decode inside the `KVHandoff`
(`handoff_media` / `spans_from_handoff`), so a decode engine can recompute the prompt after a
preemption.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from gemma4_model.batch import on_device
from gemma4_model.media_span import MediaSpan

from .handoff import from_numpy, to_numpy
from .messages import EncodeResult, KVHandoff, PrefillJob

MAX_EARLY = 4096  # results held for jobs not seen yet (their request may have been cancelled)


@dataclass
class _Waiting:
    job: PrefillJob
    since: float
    results: dict[int, EncodeResult] = field(default_factory=dict)


class MediaWaiter:
    """Jobs waiting for their encoders' results (see the module docstring)."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype, timeout_s: float = 120.0):
        self.device = device
        self.dtype = dtype
        self.timeout_s = timeout_s
        self.jobs: dict[str, _Waiting] = {}
        self.early: OrderedDict[str, dict[int, EncodeResult]] = OrderedDict()

    def pending(self) -> bool:
        return bool(self.jobs)

    def add_job(self, job: PrefillJob) -> None:
        self.jobs[job.request_id] = _Waiting(job, time.monotonic(), self.early.pop(job.request_id, {}))

    def add_result(self, result: EncodeResult) -> None:
        waiting = self.jobs.get(result.request_id)
        if waiting is not None:
            waiting.results[result.media_index] = result
            return
        self.early.setdefault(result.request_id, {})[result.media_index] = result
        while len(self.early) > MAX_EARLY:
            self.early.popitem(last=False)

    def discard(self, request_id: str) -> None:
        self.jobs.pop(request_id, None)
        self.early.pop(request_id, None)

    def ready(self) -> list[tuple[PrefillJob, tuple[MediaSpan, ...], tuple[int, str] | None]]:
        """(job, spans, None) for every complete job, (job, (), (status, message)) for failed ones."""
        out = []
        for request_id, waiting in list(self.jobs.items()):
            results, job = waiting.results, waiting.job
            failed = next((r for r in results.values() if r.error is not None), None)
            if failed is not None:
                del self.jobs[request_id]
                out.append((job, (), (400, failed.error)))
            elif len(results) == len(job.media_kinds):
                del self.jobs[request_id]
                try:
                    out.append((job, self.spans(job, results), None))
                except ValueError as exc:
                    out.append((job, (), (502, f"media encoding does not fit the prompt: {exc}")))
        return out

    def expired(self) -> list[tuple[str, int, str]]:
        now = time.monotonic()
        gone = [rid for rid, w in self.jobs.items() if now - w.since > self.timeout_s]
        for rid in gone:
            del self.jobs[rid]
        return [(rid, 504, f"media encoders did not answer within {self.timeout_s:.0f} s") for rid in gone]

    def spans(self, job: PrefillJob, results: dict[int, EncodeResult]) -> tuple[MediaSpan, ...]:
        """Each item's embeddings cut into its placeholder runs, in prompt order."""
        if set(results) != set(range(len(job.media_kinds))):
            raise ValueError(f"results for items {sorted(results)}, expected 0..{len(job.media_kinds) - 1}")
        embeddings = {i: self._tensor(r.embeddings, r.dtype) for i, r in results.items()}
        return _cut(job.media_kinds, job.media_keys, job.media_spans, embeddings)

    def _tensor(self, array: np.ndarray | None, dtype: str) -> torch.Tensor:
        if array is None or array.ndim != 2:
            raise ValueError("an encoder result carries no [tokens, hidden] embeddings")
        return from_numpy(array, dtype).to(device=self.device, dtype=self.dtype)


def _cut(kinds, keys, spans: np.ndarray | None, embeddings: dict[int, torch.Tensor]) -> tuple[MediaSpan, ...]:
    if spans is None or spans.ndim != 2 or spans.shape[1] != 3 or len(keys) != len(kinds):
        raise ValueError("media spans must be [spans, 3] with one kind and key per item")
    used = {i: 0 for i in embeddings}
    out = []
    for item, start, length in spans.tolist():
        if item not in embeddings:
            raise ValueError(f"span names item {item}, which has no embeddings")
        offset = used[item]
        piece = embeddings[item][offset:offset + length]
        if len(piece) != length:
            raise ValueError(f"item {item} has {len(embeddings[item])} soft tokens, fewer than its placeholders")
        used[item] = offset + length
        out.append(MediaSpan(start, piece, kinds[item], f"{keys[item]}:{offset}".encode()))
    short = [i for i, n in used.items() if n != len(embeddings[i])]
    if short:
        raise ValueError(f"item {short[0]} has {len(embeddings[short[0]])} soft tokens but "
                         f"{used[short[0]]} placeholders")
    return tuple(out)


def handoff_media(spans: tuple[MediaSpan, ...]) -> dict:
    """A sequence's media spans as `KVHandoff` fields (one item per span)."""
    if not spans:
        return {}
    embeddings, dtype = to_numpy(torch.cat([s.embeddings for s in spans]))
    return {"media_kinds": [s.kind for s in spans], "media_keys": [s.content_key.hex() for s in spans],
            "media_spans": np.asarray([(i, s.start, len(s.embeddings)) for i, s in enumerate(spans)], dtype=np.int32),
            "media_embeddings": embeddings, "media_dtype": dtype}


def spans_from_handoff(msg: KVHandoff, device, dtype: torch.dtype) -> tuple[MediaSpan, ...]:
    """The inverse of `handoff_media` (raises ValueError for inconsistent fields)."""
    if not msg.media_kinds:
        return ()
    if msg.media_embeddings is None or msg.media_spans is None or msg.media_embeddings.ndim != 2:
        raise ValueError("a multimodal handoff needs its media spans and embeddings")
    flat = on_device(from_numpy(msg.media_embeddings, msg.media_dtype), device).to(dtype)  # not behind a step in flight
    lengths = msg.media_spans[:, 2].tolist() if msg.media_spans.ndim == 2 else []
    if sum(lengths) != len(flat) or len(lengths) != len(msg.media_kinds):
        raise ValueError("media embeddings do not match their spans")
    pieces = dict(enumerate(torch.split(flat, lengths)))
    spans = _cut(msg.media_kinds, msg.media_keys, msg.media_spans, pieces)
    return tuple(MediaSpan(s.start, s.embeddings, s.kind, bytes.fromhex(msg.media_keys[i]))
                 for i, s in enumerate(spans))
