"""The preprocess actor: chat template, media and tokenization, turning a `GenerateRequest` into
a `PrefillJob` for prefill (or the colocated engine) and one `EncodeJob` per media item.

Detokenization lives in the api actor, not here: the api owns the client's stream and runs the
reasoning / tool-call parsers on the text, so sending token ids back to it directly saves a hop
per token. Bad input (unparseable messages, a template that refuses them) ends the request at
once with a `RequestError`.
"""

from __future__ import annotations

import itertools
import json
import threading
import zlib
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from gemma4_model.tool_grammar import forced_tool_call_ebnf

from .media_inputs import MediaError, ProcessedMedia
from .media_prompt import PART_KINDS, MediaPrompt
from .messages import EncodeJob, GenerateRequest, PrefillJob, RequestError, SamplingSpec
from .tracing import Tracer
from .transport import Channel

THINKING_START, THINKING_END = "<|channel>", "<channel|>"  # Gemma 4's thinking channel; a grammar starts after it


ENCODER_OF = {"image": "vision_encoder", "video": "vision_encoder", "audio": "audio_encoder"}


@dataclass(frozen=True)
class Prepared:
    """A request ready to go: its prefill job and its processed media items (in prompt order)."""

    job: PrefillJob
    media: list[ProcessedMedia] = field(default_factory=list)


class Preprocessor:
    """Renders OpenAI-style messages through the checkpoint's chat template and tokenizes;
    with a `MediaPrompt`, also loads and processes their images, audio and video."""

    def __init__(self, tokenizer, stop_token_ids: list[int], media: MediaPrompt | None = None):
        self.tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self.media = media

    def close(self) -> None:
        """Shuts down the media pool (if any); the preprocessor takes no request after this."""
        if self.media is not None:
            self.media.close()

    def prefill_job(self, request: GenerateRequest) -> PrefillJob:
        return self.prepare(request).job

    def prepare(self, request: GenerateRequest) -> Prepared:
        """Raises ValueError (`MediaError` with the part at fault) with a client-facing message
        when the request cannot be rendered."""
        if request.prompt_ids is not None or request.prompt_text is not None:
            return Prepared(self._job(request, self._completion_ids(request)))
        try:
            body = json.loads(request.messages_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"messages are not valid JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ValueError("expected an object with a non-empty 'messages' list")
        messages = [_with_parsed_arguments(m) for m in body["messages"]]
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError("'chat_template_kwargs' must be an object")
        items: list[ProcessedMedia] = []
        if self.media is not None:
            messages, items = self.media.collect(messages, body.get("mm_processor_kwargs"))
        elif _has_media(messages):
            raise ValueError("this server was started without media support")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=body.get("tools") or None, tokenize=False, add_generation_prompt=True, **kwargs,
            )
        except Exception as exc:  # jinja raises many types for messages it cannot render
            raise ValueError(f"the chat template cannot render these messages: {exc}") from None
        if self.media is not None:
            text = self.media.expand(text, items)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        job = self._job(request, ids, thinking=bool(kwargs.get("enable_thinking")), tools=body.get("tools") or [])
        if items:
            job = replace(job, media_kinds=[m.kind for m in items], media_keys=[m.content_hash for m in items],
                          media_spans=self.media.spans(ids, items))
        return Prepared(job, items)

    def _completion_ids(self, request: GenerateRequest) -> list[int]:
        """A completions prompt: token ids as given (checked against the vocabulary), or text
        tokenized as the tokenizer does by default (with its BOS), as `transformers` would."""
        if request.prompt_ids is None:
            return self.tokenizer(request.prompt_text).input_ids
        vocab = len(self.tokenizer)
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of the vocabulary [0, {vocab}): {bad[:5]}")
        return list(request.prompt_ids)

    def _job(self, request: GenerateRequest, ids: list[int], thinking: bool = False, tools: list | None = None) -> PrefillJob:
        if not ids:
            raise ValueError("the prompt has no tokens")
        sampling = forced_call_grammar(request.sampling, tools or [])
        model_stops = set() if sampling.ignore_eos else set(self.stop_token_ids)  # benchmarks run to max_tokens
        stops = sorted(set(sampling.stop_token_ids) | model_stops)
        fields = {**sampling.__dict__, "stop_token_ids": stops}
        if thinking and sampling.grammar_kind is not None:  # the answer, not the thinking, follows the grammar
            fields["grammar_open_token_id"] = self.tokenizer.convert_tokens_to_ids(THINKING_START)
            fields["grammar_after_token_id"] = self.tokenizer.convert_tokens_to_ids(THINKING_END)
        spec = type(sampling)(**fields)
        return PrefillJob(request.request_id, np.asarray(ids, dtype=np.int32), spec)


def forced_call_grammar(sampling: SamplingSpec, tools: list) -> SamplingSpec:
    """tool_choice "required" / "function:NAME" as the grammar of one Gemma 4 call of those tools."""
    if sampling.tool_choice is None:
        return sampling
    if sampling.grammar_kind is not None:
        raise ValueError("response_format cannot be combined with a forced tool_choice")
    name = sampling.tool_choice.removeprefix("function:") if sampling.tool_choice.startswith("function:") else None
    grammar = forced_tool_call_ebnf(tools, name)  # ValueError names an unknown function or a bad tool
    return replace(sampling, grammar_kind="ebnf", grammar=grammar)


def _has_media(messages: list) -> bool:
    return any(isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"] in PART_KINDS
               for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list) for part in m["content"])


def encode_job(request_id: str, index: int, item: ProcessedMedia, reply_to: int, siblings: int = 1) -> EncodeJob:
    """One processed media item as the encoder's job (`siblings`: the request's jobs for that replica)."""
    if item.kind == "audio":
        return EncodeJob(request_id, index, item.kind, item.content_hash, reply_to,
                         features=item.features, feature_mask=item.feature_mask, siblings=siblings)
    frames = item.kind == "video"  # an image is one frame
    return EncodeJob(request_id, index, item.kind, item.content_hash, reply_to,
                     pixel_values=item.pixel_values if frames else item.pixel_values[None],
                     position_ids=item.position_ids if frames else item.position_ids[None],
                     pixel_table=item.pixel_table, siblings=siblings)


def _with_parsed_arguments(message):
    """OpenAI clients send tool-call arguments as JSON text; the Gemma 4 template wants a mapping."""
    if not isinstance(message, dict) or not isinstance(message.get("tool_calls"), list):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except json.JSONDecodeError:
                raise ValueError(f"tool call {function.get('name')!r}: arguments are not valid JSON") from None
            if not isinstance(arguments, dict):
                raise ValueError(f"tool call {function.get('name')!r}: arguments must be a JSON object")
            call = {**call, "function": {**function, "arguments": arguments}}
        calls.append(call)
    return {**message, "tool_calls": calls}


class PreprocessActor:
    """Pulls `GenerateRequest`s, pushes `PrefillJob`s downstream and errors back to the api.

    `downstream` is one channel per engine (or prefill) replica, taken in turn; a request's
    media items go to `encoders[kind]` replicas chosen by content hash (a repeat meets the
    replica that cached it), each told which engine replica waits for it. The actor owns its
    preprocessor: when `run` ends, the preprocessor is closed (its media threads stop)."""

    def __init__(self, preprocessor: Preprocessor, inbox: Channel, downstream: Channel | Sequence[Channel],
                 errors: Channel, tracer: Tracer | None = None,
                 encoders: dict[str, Sequence[Channel]] | None = None):
        self.preprocessor = preprocessor
        self.inbox = inbox
        self.downstream = [downstream] if isinstance(downstream, Channel) else list(downstream)
        self.turn = itertools.cycle(range(len(self.downstream)))
        self.errors = errors
        self.tracer = tracer or Tracer("preprocess", None)
        self.encoders = {kind: list(chans) for kind, chans in (encoders or {}).items() if chans}

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                msg = self.inbox.recv(timeout_ms=50)
                self.tracer.tick()
                if msg is None:
                    continue
                if not isinstance(msg, GenerateRequest):
                    raise TypeError(f"preprocess got an unexpected {type(msg).__name__}")
                self.handle(msg)
        finally:
            self.preprocessor.close()

    def handle(self, msg: GenerateRequest) -> None:
        try:
            with self.tracer.span("tokenize", msg.request_id) as attrs:
                prepared = self.preprocessor.prepare(msg)
                attrs["tokens"] = len(prepared.job.token_ids)
                if prepared.media:
                    attrs["media"] = len(prepared.media)
            self.dispatch(prepared)
        except MediaError as exc:
            self.errors.send(RequestError(msg.request_id, 400, exc.message, param=exc.param))
        except ValueError as exc:
            self.errors.send(RequestError(msg.request_id, 400, str(exc)))

    def dispatch(self, prepared: Prepared) -> None:
        for item in prepared.media:  # all or nothing: no job leaves for a request that fails here
            if not self.encoders.get(ENCODER_OF[item.kind]):
                raise ValueError(f"{item.kind} input is not supported by this server: its topology has no "
                                 f"{ENCODER_OF[item.kind].replace('_', ' ')}")
        replica = next(self.turn)
        chosen = []
        for item in prepared.media:
            encoders = self.encoders[ENCODER_OF[item.kind]]
            chosen.append(encoders[zlib.crc32(item.content_hash.encode()) % len(encoders)])
        for index, (item, channel) in enumerate(zip(prepared.media, chosen)):
            siblings = sum(c is channel for c in chosen)  # the encoder waits for them all, then encodes them together
            channel.send(encode_job(prepared.job.request_id, index, item, replica, siblings))
        self.downstream[replica].send(prepared.job)
