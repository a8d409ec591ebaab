"""Response bodies and stream chunks in OpenAI's shapes for chat completions and completions."""

from __future__ import annotations

import time

from .generation import Choice, ChoiceDelta
from .logprobs import TokenText, chat_entries, completion_logprobs


class ResponseFormat:
    """Shared by both routes: ids, timestamps, and per-choice logprobs accumulated for the full body."""

    object = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, names: TokenText, model: str, num_choices: int, want_logprobs: bool, request_id: str):
        self.names = names
        self.model = model
        self.want_logprobs = want_logprobs
        self.id = f"{self.id_prefix}{request_id}"
        self.created = int(time.time())
        self.offsets = [0] * num_choices
        self.sent_role = [False] * num_choices
        self.collected: list[list] = [[] for _ in range(num_choices)]

    def envelope(self, chunk: bool, choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> dict:
        body = {"id": self.id, "object": self.chunk_object if chunk else self.object, "created": self.created,
                "model": self.model, "choices": choices}
        if usage is not None or with_usage:
            body["usage"] = usage
        return body

    def usage_chunk(self, usage: dict) -> dict:
        return self.envelope(True, [], usage)


class ChatFormat(ResponseFormat):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def _entries(self, delta: ChoiceDelta) -> list[dict] | None:
        if not self.want_logprobs or delta.logprobs is None:
            return None
        return chat_entries(self.names, delta.token_ids, delta.logprobs, delta.top)

    def chunk_choice(self, index: int, delta: ChoiceDelta) -> dict:
        message: dict = {"content": delta.text}
        if delta.reasoning:
            message["reasoning_content"] = message["reasoning"] = delta.reasoning
        if delta.tool_calls:
            message["tool_calls"] = delta.tool_calls
            if not delta.text:
                message["content"] = None
        if not self.sent_role[index]:
            message = {"role": "assistant", **message}
            self.sent_role[index] = True
        entries = self._entries(delta)
        return {"index": index, "delta": message, "logprobs": {"content": entries} if entries is not None else None,
                "finish_reason": delta.finish_reason}

    def collect(self, index: int, delta: ChoiceDelta) -> None:
        entries = self._entries(delta)
        if entries is not None:
            self.collected[index].extend(entries)

    def full_choice(self, choice: Choice) -> dict:
        logprobs = {"content": self.collected[choice.index]} if self.want_logprobs and self.collected[choice.index] else None
        message: dict = {"role": "assistant", "content": choice.text}
        if choice.output is not None:
            reasoning = choice.output.reasoning_text
            message["reasoning_content"] = message["reasoning"] = reasoning
            if choice.output.calls:
                message["tool_calls"] = choice.output.calls
                message["content"] = choice.text or None
        return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason}


class CompletionFormat(ResponseFormat):
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def _logprobs(self, index: int, delta: ChoiceDelta) -> dict | None:
        if not self.want_logprobs or delta.logprobs is None:
            return None
        out = completion_logprobs(self.names, delta.token_ids, delta.logprobs, delta.top, self.offsets[index])
        self.offsets[index] += sum(len(t) for t in out["tokens"])
        return out

    def chunk_choice(self, index: int, delta: ChoiceDelta) -> dict:
        return {"index": index, "text": delta.text, "logprobs": self._logprobs(index, delta),
                "finish_reason": delta.finish_reason}

    def collect(self, index: int, delta: ChoiceDelta) -> None:
        part = self._logprobs(index, delta)
        if part is not None:
            self.collected[index].append(part)

    def full_choice(self, choice: Choice) -> dict:
        parts = self.collected[choice.index]
        logprobs = None
        if parts:
            logprobs = {key: [v for p in parts for v in (p[key] or [])] for key in
                        ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
            if all(p["top_logprobs"] is None for p in parts):
                logprobs["top_logprobs"] = None
        return {"index": choice.index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}
