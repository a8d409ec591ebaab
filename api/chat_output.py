"""A chat choice's output text split into reasoning, content and tool calls.

The api decodes chat output with the format markers kept (`<|channel>`, `<channel|>` and, when
tool calls are parsed, `<|tool_call>`, `<tool_call|>`, `<|"|>`) and every other special token
dropped by id before decoding (`<turn|>`, `<|tool_response>`, ...): parsing the text rather than
token ids keeps one parser for whatever split the detokenizer and stop strings make, and a
marker is one token, so it never arrives half decoded from the model (the parsers still hold a
possible partial marker back, for any split). `ChatOutput` runs the reasoning parser, then the
tool-call parser on its content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .reasoning import CHANNEL_CLOSE, CHANNEL_OPEN, ReasoningParser
from .tool_parser import CALL_CLOSE, CALL_OPEN, QUOTE, ToolCallParser, new_call_id

REASONING_MARKERS = (CHANNEL_OPEN, CHANNEL_CLOSE)
TOOL_MARKERS = (CALL_OPEN, CALL_CLOSE, QUOTE)


@dataclass(frozen=True)
class ChatOutputConfig:
    """How one chat request's output is parsed."""

    thinking: bool = False  # report the thought channel as reasoning (else it is dropped)
    start_in_reasoning: bool = False  # the prompt ends inside an opened thought channel
    parse_tools: bool = False  # tools were given and tool_choice is not "none"
    max_calls: int | None = None  # parallel_tool_calls false: 1


@dataclass(frozen=True)
class SpecialIds:
    """Special token ids that chat text never shows; the format markers are kept."""

    drop_with_tools: frozenset[int]
    drop_without_tools: frozenset[int]

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = {i: t.content for i, t in decoder.items() if getattr(t, "special", False)}
        special.update({i: tokenizer.convert_ids_to_tokens(i) for i in getattr(tokenizer, "all_special_ids", [])})
        return cls(frozenset(i for i, s in special.items() if s not in REASONING_MARKERS + TOOL_MARKERS),
                   frozenset(i for i, s in special.items() if s not in REASONING_MARKERS))

    def dropped(self, parse_tools: bool) -> frozenset[int]:
        return self.drop_with_tools if parse_tools else self.drop_without_tools


@dataclass
class OutputDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI streaming tool_call deltas


class ChatOutput:
    """`feed(text) -> OutputDelta`, `flush()`; also keeps the whole result for a full body."""

    def __init__(self, config: ChatOutputConfig, id_factory=new_call_id):
        self.config = config
        self.reasoning = ReasoningParser(config.start_in_reasoning)
        self.tools = ToolCallParser(id_factory) if config.parse_tools else None
        self.reasoning_parts: list[str] = []
        self.content_parts: list[str] = []
        self.calls: list[dict] = []  # the full calls, arguments accumulated

    def feed(self, text: str) -> OutputDelta:
        return self._route(*self.reasoning.feed(text), final=False) if text else OutputDelta()

    def flush(self) -> OutputDelta:
        return self._route(*self.reasoning.flush(), final=True)

    def _route(self, reasoning: str, content: str, final: bool) -> OutputDelta:
        out = OutputDelta(reasoning if self.config.thinking else "")
        if self.tools is None:
            out.content = content
        else:
            parsed = self.tools.feed(content) if content else None
            if final:
                tail = self.tools.flush()
                parsed = tail if parsed is None else _join(parsed, tail)
            if parsed is not None:
                out.content = parsed.content
                limit = self.config.max_calls
                out.tool_calls = _merged([d for d in parsed.calls if limit is None or d.index < limit])
        self.reasoning_parts.append(out.reasoning)
        self.content_parts.append(out.content)
        for delta in out.tool_calls:
            if "id" in delta:
                self.calls.append({"id": delta["id"], "type": "function",
                                   "function": {"name": delta["function"]["name"], "arguments": ""}})
            self.calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
        return out

    @property
    def reasoning_text(self) -> str | None:
        text = "".join(self.reasoning_parts)
        return text if self.config.thinking and text else None

    @property
    def content_text(self) -> str:
        return "".join(self.content_parts)


def _merged(deltas) -> list[dict]:
    """OpenAI deltas, argument fragments of one call that follow each other joined into one."""
    out: list[dict] = []
    for d in deltas:
        if d.id is None and out and out[-1]["index"] == d.index and "id" not in out[-1]:
            out[-1]["function"]["arguments"] += d.arguments
        else:
            out.append(d.openai())
    return out


def _join(a, b):
    a.content += b.content
    a.calls.extend(b.calls)
    return a
