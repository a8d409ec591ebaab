"""One HTTP request's generation: its engine requests (n per prompt), their merged results,
and each choice's text, stop strings, logprobs and usage.

`Choice.feed` turns a `TokenBatch` into a `ChoiceDelta`; `Generation` submits the requests,
yields `(choice index, message)` in arrival order and cancels whatever is unfinished when the
client goes away or a stop string ends a choice early.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from actors.messages import GenerateRequest, RequestError, SamplingSpec, TokenBatch

from .backend import RequestStream, ZmqBackend
from .chat_output import ChatOutput, ChatOutputConfig, SpecialIds
from .detokenize import IncrementalDetokenizer, StopStringMatcher
from .errors import ApiError
from .schema import ChatCompletionRequest, CompletionRequest


def sampling_spec(body: ChatCompletionRequest | CompletionRequest, default_max_tokens: int, seed: int | None) -> SamplingSpec:
    return SamplingSpec(
        max_tokens=body.token_limit or default_max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=max(body.top_k, 0), seed=seed, ignore_eos=body.ignore_eos, min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, min_tokens=body.min_tokens, logprobs=body.top_count,
        tool_choice=_forced_tool(body), **grammar_fields(body),
    )


def grammar_fields(body: ChatCompletionRequest | CompletionRequest) -> dict:
    """`response_format` as the engine's grammar (kind and text); the engine compiles it and
    answers 400 naming `response_format` when it cannot. Plain text needs none."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return {}
    schema = {"type": "object"} if fmt.type == "json_object" else fmt.json_schema.schema_
    return {"grammar_kind": "json_schema", "grammar": json.dumps(schema)}


def _forced_tool(body) -> str | None:
    """tool_choice "required" or a named function, for the structured-output grammar to enforce."""
    mode = body.tool_mode if isinstance(body, ChatCompletionRequest) else "none"
    return mode if mode == "required" or mode.startswith("function:") else None


def chat_output_config(body: ChatCompletionRequest) -> ChatOutputConfig:
    """Thinking (from `chat_template_kwargs.enable_thinking`), tool parsing and the call limit."""
    thinking = bool((body.chat_template_kwargs or {}).get("enable_thinking"))
    # The template opens the thought channel itself after a tool response when thinking is on.
    return ChatOutputConfig(thinking=thinking, start_in_reasoning=thinking and body.messages[-1].role == "tool",
                            parse_tools=body.tool_mode != "none",
                            max_calls=None if body.parallel_tool_calls else 1)


def engine_requests(body: ChatCompletionRequest | CompletionRequest, default_max_tokens: int) -> list[GenerateRequest]:
    """n requests per prompt, choice index = prompt index * n + i; seeds seed + i when a seed is given."""
    if isinstance(body, ChatCompletionRequest):
        chat = {"messages": [m.model_dump(exclude_none=True) for m in body.messages]}
        if body.tools and body.tool_mode != "none":  # tool_choice none: the template gets no tools
            chat["tools"] = body.tools
        if body.chat_template_kwargs:
            chat["chat_template_kwargs"] = body.chat_template_kwargs
        if body.mm_processor_kwargs:
            chat["mm_processor_kwargs"] = body.mm_processor_kwargs
        prompts: list[dict] = [{"messages_json": json.dumps(chat)}]
    else:
        prompts = [{"messages_json": "", "prompt_text": p} if isinstance(p, str) else
                   {"messages_json": "", "prompt_ids": list(p)} for p in body.prompts]
    limit = body.token_limit or default_max_tokens
    if body.min_tokens > limit:
        raise ApiError(400, f"min_tokens ({body.min_tokens}) exceeds max_tokens ({limit})", param="min_tokens")
    base = uuid.uuid4().hex
    out = []
    for p, prompt in enumerate(prompts):
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            out.append(GenerateRequest(f"{base}-{p * body.n + i}", sampling=sampling_spec(body, default_max_tokens, seed),
                                       stream=body.stream, **prompt))
    return out


@dataclass
class ChoiceDelta:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top: list[list[tuple[int, float]]] | None
    finish_reason: str | None
    reasoning: str = ""  # chat with a parsed output: the thought channel's delta
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI streaming tool_call deltas


@dataclass
class Choice:
    """The client-facing state of one choice."""

    index: int
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    output: ChatOutput | None = None  # chat: reasoning / content / tool calls split out of the text
    dropped_ids: frozenset[int] = frozenset()  # special ids kept out of the text (markers stay)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, batch: TokenBatch) -> ChoiceDelta:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if batch.prompt_tokens is not None:
            self.prompt_tokens = batch.prompt_tokens
            self.cached_tokens = batch.cached_tokens or 0
        self.completion_tokens += len(batch.token_ids)
        self.token_ids.extend(batch.token_ids)
        ids = [t for t in batch.token_ids if t not in self.dropped_ids] if self.dropped_ids else list(batch.token_ids)
        text = self.stops.feed(self.detokenizer.add(ids))
        if self.stops.stopped:
            self.finish_reason = "stop"
        elif batch.finish_reason is not None:
            text += self.stops.feed(self.detokenizer.flush())
            if self.stops.stopped:
                self.finish_reason = "stop"
            else:
                text += self.stops.flush()
                self.finish_reason = batch.finish_reason
        reasoning, tool_calls = "", []
        if self.output is not None:
            parsed = self.output.feed(text)
            if self.finished:
                tail = self.output.flush()
                parsed.reasoning += tail.reasoning
                parsed.content += tail.content
                parsed.tool_calls += tail.tool_calls
                if self.output.calls and self.finish_reason == "stop":
                    self.finish_reason = "tool_calls"
            text, reasoning, tool_calls = parsed.content, parsed.reasoning, parsed.tool_calls
        self.text_parts.append(text)
        top = None
        if batch.top_ids is not None and batch.top_logprobs is not None:
            top = [list(zip(ids.tolist(), lps.tolist())) for ids, lps in zip(batch.top_ids, batch.top_logprobs)]
        return ChoiceDelta(text, list(batch.token_ids), list(batch.logprobs) if batch.logprobs is not None else None,
                           top, self.finish_reason, reasoning, tool_calls)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class Generation:
    """The engine requests behind one HTTP request and their merged results."""

    def __init__(self, backend: ZmqBackend, tokenizer, requests: list[GenerateRequest], stops: list[str],
                 timeout_s: float | None = None, output: ChatOutputConfig | None = None,
                 special: SpecialIds | None = None):
        """`output` (chat): decode with the format markers kept and split reasoning, content and
        tool calls (`special` names the ids to drop, default: read from the tokenizer)."""
        self.backend = backend
        self.timeout_s = timeout_s
        self.requests = requests
        if output is None:
            self.choices = [Choice(i, IncrementalDetokenizer(tokenizer), StopStringMatcher(stops))
                            for i in range(len(requests))]
        else:
            dropped = (special or SpecialIds.of(tokenizer)).dropped(output.parse_tools)
            self.choices = [Choice(i, IncrementalDetokenizer(tokenizer, skip_special_tokens=False),
                                   StopStringMatcher(stops), output=ChatOutput(output), dropped_ids=dropped)
                            for i in range(len(requests))]
        self.started_at = time.monotonic()
        self.started_ns = time.time_ns()  # the traces' common clock
        self._streams: list[RequestStream] = []
        self._merged: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []

    def submit(self) -> None:
        """Send every request; if one is refused, cancel those already sent and raise."""
        try:
            for request in self.requests:
                self._streams.append(self.backend.submit(request))
        except ApiError:
            self.abort()
            raise
        self._pumps = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self._streams)]

    async def _pump(self, index: int, stream: RequestStream) -> None:
        async for msg in stream:
            await self._merged.put((index, msg))

    async def results(self) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        """Each choice's deltas in arrival order until every choice has finished; a
        `RequestError` of any choice raises `ApiError` (the others are then cancelled)."""
        while not all(c.finished for c in self.choices):
            index, msg = await self._next()
            choice = self.choices[index]
            if choice.finished:
                continue  # tokens that were in flight when a stop string ended the choice
            if isinstance(msg, RequestError):
                self.abort()
                raise ApiError(msg.code, msg.message, param=msg.param)
            delta = choice.feed(msg)
            if choice.finished and msg.finish_reason is None:
                self.backend.cancel(self.requests[index].request_id)  # a stop string: the engine may stop
            elif msg.finish_reason is not None:
                self.backend.finished(self.requests[index].request_id)
            yield index, delta

    async def _next(self) -> tuple[int, TokenBatch | RequestError]:
        if self.timeout_s is None:
            return await self._merged.get()
        left = self.started_at + self.timeout_s - time.monotonic()
        try:
            return await asyncio.wait_for(self._merged.get(), max(left, 0.0))
        except asyncio.TimeoutError:
            self.abort()
            raise ApiError(504, f"the request did not finish within {self.timeout_s:g} s (request timeout)") from None

    def abort(self) -> None:
        """Cancel every unfinished request (client gone, error, or shutdown)."""
        for request, choice in zip(self.requests, self.choices):
            if not choice.finished:
                self.backend.cancel(request.request_id)
        for task in self._pumps:
            task.cancel()

    def usage(self, n: int) -> dict:
        prompt = sum(self.choices[p].prompt_tokens or 0 for p in range(0, len(self.choices), n))
        cached = sum(self.choices[p].cached_tokens for p in range(0, len(self.choices), n))
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}
