"""Multimodal chat prompts in the preprocess actor: media parts in, placeholder runs and
processed items out.

The OpenAI media parts (`image_url`, `input_audio`, `audio_url`, `video_url`) are loaded
(`data:` URLs and base64 audio always; http(s) only from the allowed hosts, which the api
checked too), decoded and processed by `MediaProcessor` (actors/media_inputs.py), and replaced
by the plain `{"type": "image" | "audio" | "video"}` parts the Gemma 4 chat template renders as
one placeholder token each. After the template, each placeholder becomes the item's full
expansion (begin marker, its soft-token placeholders, end marker, as the Gemma 4 processor
writes it), and once tokenized every run of soft-token placeholders is located: the spans an
item's embeddings will fill at prefill.

A request's items are loaded and processed side by side on a small thread pool: JPEG/PNG
decoding, PIL resizing, numpy and hashing release the GIL, so two images cost about one.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .media_inputs import MediaError, MediaProcessor, ProcessedMedia, fetch_url, parse_data_uri

PART_KINDS = {"image_url": "image", "input_audio": "audio", "audio_url": "audio", "video_url": "video"}
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}


@dataclass(frozen=True)
class FetchPolicy:
    """Which media URLs the server fetches, and for how long (the topology's [api] section)."""

    allowed_hosts: tuple[str, ...] = ()
    timeout_s: float = 10.0


@dataclass(frozen=True)
class Placeholders:
    """The checkpoint's placeholder token ids and their text (what the chat template writes)."""

    ids: Mapping[str, int]  # kind -> soft-token placeholder id
    text: Mapping[str, str]  # kind -> its token's text, e.g. "<|image|>"

    @classmethod
    def from_tokenizer(cls, tokenizer, special_tokens: Mapping[str, int]) -> "Placeholders":
        ids = {kind: special_tokens[f"{kind}_token_id"] for kind in ("image", "audio", "video")
               if f"{kind}_token_id" in special_tokens}
        return cls(ids, {kind: tokenizer.convert_ids_to_tokens(i) for kind, i in ids.items()})


class MediaPrompt:
    """Loads and processes a chat's media, then expands and locates its placeholders.

    Owns the pool its items are processed on (`workers` threads, by default one per core up to
    8, the default image limit of a prompt); `close` shuts it down."""

    def __init__(self, processor: MediaProcessor, fetch: FetchPolicy, tokens: Placeholders, workers: int | None = None):
        self.processor = processor
        self.fetch = fetch
        self.tokens = tokens
        self.max_bytes = processor.limits.max_item_bytes
        self.pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1), thread_name_prefix="media")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.processor.close()

    def collect(self, messages: list, mm_kwargs: Mapping[str, Any] | None) -> tuple[list, list[ProcessedMedia]]:
        """The messages with media parts made template-ready, and the items in prompt order.

        Every part is counted before any is loaded (a prompt over a limit costs no decoding);
        then all are loaded and processed at once, and the error of the first failing item in
        prompt order is raised, as one by one would, once no work of this request still runs."""
        budget = (mm_kwargs or {}).get("max_soft_tokens")  # None: the server's default
        jobs: list[tuple[str, dict, str]] = []  # (kind, part, param) in prompt order
        out = []
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                out.append(message)
                continue
            parts = []
            for j, part in enumerate(content):
                kind_name = part.get("type") if isinstance(part, dict) else None
                kind = PART_KINDS.get(kind_name) if isinstance(kind_name, str) else None
                if kind is None:
                    parts.append(part)
                    continue
                param = f"messages.{i}.content.{j}"
                self._check_count(kind, [job[0] for job in jobs], param)
                jobs.append((kind, part, param))
                parts.append({"type": kind})
            out.append({**message, "content": parts})
        futures = [self.pool.submit(self._item, kind, part, budget, param) for kind, part, param in jobs]
        try:
            return out, [f.result() for f in futures]  # in prompt order: the first failure is the error
        finally:
            for f in futures:  # after a failure, the items not started are dropped and the running ones awaited
                f.cancel()
            wait(futures)

    def _check_count(self, kind: str, earlier: Sequence[str], param: str) -> None:
        """`earlier`: the kinds of the prompt's media parts before this one."""
        if kind not in self.tokens.ids:
            raise MediaError(param, f"this model takes no {kind} input")
        counts = {k: earlier.count(k) + (k == kind) for k in ("image", "audio", "video")}
        self.processor.limits.check_counts(counts["image"], counts["audio"], counts["video"], param=param)

    def _item(self, kind: str, part: dict, budget: int | None, param: str) -> ProcessedMedia:
        return self._process(kind, self._load(part, param), budget, param)

    def _load(self, part: dict, param: str) -> bytes:
        value = part.get(part["type"])
        if part["type"] == "input_audio":
            if not isinstance(value, dict) or not isinstance(value.get("data"), str):
                raise MediaError(param, "input_audio needs base64 'data'")
            fmt = value.get("format", "wav")
            if not isinstance(fmt, str):
                raise MediaError(param, "input_audio format must be a string (e.g. 'wav')")
            mime = AUDIO_FORMATS.get(fmt, f"audio/{fmt}")
            return parse_data_uri(f"data:{mime};base64,{value['data']}", self.max_bytes, param)[1]
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise MediaError(param, f"{part['type']} needs a url")
        if url.startswith("data:"):
            return parse_data_uri(url, self.max_bytes, param)[1]
        from api.media import host_allowed  # the same rule the api applied
        from urllib.parse import urlsplit

        host = urlsplit(url).hostname or ""
        if urlsplit(url).scheme not in ("http", "https") or not host_allowed(host, self.fetch.allowed_hosts):
            raise MediaError(param, f"fetching media from {host or url!r} is not allowed on this server")
        return fetch_url(url, self.max_bytes, self.fetch.timeout_s, param)[1]

    def _process(self, kind: str, data: bytes, budget: int | None, param: str) -> ProcessedMedia:
        if kind == "image":
            return self.processor.image(data, budget, param)
        if kind == "video":
            return self.processor.video(data, budget, param)
        return self.processor.audio(data, param)

    def expand(self, text: str, items: Sequence[ProcessedMedia]) -> str:
        """Each item's one-token placeholder in the rendered template -> its full expansion."""
        pieces, rest = [], text
        for n, item in enumerate(items):
            marker = self.tokens.text[item.kind]
            head, found, rest = rest.partition(marker)
            if not found:
                raise MediaError("messages", f"the chat template rendered no placeholder for media item {n} ({item.kind})")
            pieces += [head, item.placeholder_text]
        if any(rest.count(self.tokens.text[k]) for k in self.tokens.text):
            raise MediaError("messages", "the prompt text contains media placeholder tokens without media")
        return "".join(pieces) + rest

    def spans(self, ids: Sequence[int], items: Sequence[ProcessedMedia]) -> np.ndarray:
        """int32 [spans, 3]: (item index, first position, length) of every placeholder run, the
        runs given to items in prompt order until each has its soft-token count."""
        kind_of = {i: k for k, i in self.tokens.ids.items()}
        runs = []
        pos = 0
        while pos < len(ids):
            kind = kind_of.get(ids[pos])
            if kind is None:
                pos += 1
                continue
            end = pos
            while end < len(ids) and ids[end] == ids[pos]:
                end += 1
            runs.append((kind, pos, end - pos))
            pos = end
        spans, r = [], 0
        for n, item in enumerate(items):
            need = item.num_soft_tokens
            while need > 0 and r < len(runs) and runs[r][0] == item.kind and runs[r][2] <= need:
                spans.append((n, runs[r][1], runs[r][2]))
                need -= runs[r][2]
                r += 1
            if need:
                raise MediaError("messages", f"media item {n} ({item.kind}): the prompt's placeholders do not match "
                                             f"its {item.num_soft_tokens} soft tokens")
        if r != len(runs):
            raise MediaError("messages", "the prompt has more media placeholders than media items")
        return np.asarray(spans, dtype=np.int32).reshape(-1, 3)
