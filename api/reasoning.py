"""Gemma 4's thinking channel, separated from the answer incrementally.

The model thinks as `<|channel>thought` + newline + the reasoning + `<channel|>`, then answers.
`ReasoningParser.feed(text)` takes text deltas (decoded with these markers kept) and returns
`(reasoning delta, content delta)`; a tail that could be the start of a marker is held back until
the next delta settles it, so every split of the same text gives the same result. The channel's
label (`thought`, up to the first newline) is never part of either. When the prompt already
opened the channel (the template does so after a tool response with thinking on), the parser
starts inside it. A stray `<channel|>` outside a channel is dropped. Whether reasoning is shown
is the caller's choice: with thinking off the api discards it, so nothing of a thought channel
reaches the content even when the model emits one anyway.
"""

from __future__ import annotations

CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
_MAX_LABEL = 64  # a "label" longer than this without a newline is taken as reasoning text


def partial_marker_tail(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`."""
    longest = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:k]):
                longest = k
                break
    return longest


class ReasoningParser:
    """`feed(text) -> (reasoning, content)`; `flush()` at the end of the output."""

    def __init__(self, start_in_reasoning: bool = False):
        self.in_channel = start_in_reasoning
        self.in_label = False  # inside a channel, before its label's newline
        self.label = ""
        self.held = ""

    def feed(self, text: str) -> tuple[str, str]:
        buffer = self.held + text
        self.held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while buffer:
            if self.in_label:
                buffer = self._read_label(buffer)
                if self.in_label:
                    break
                continue
            marker = CHANNEL_CLOSE if self.in_channel else CHANNEL_OPEN
            out = reasoning if self.in_channel else content
            at = buffer.find(marker)
            stray = -1 if self.in_channel else buffer.find(CHANNEL_CLOSE)
            if stray >= 0 and (at < 0 or stray < at):  # a close marker outside any channel: drop it
                out.append(buffer[:stray])
                buffer = buffer[stray + len(CHANNEL_CLOSE):]
                continue
            if at < 0:
                keep = partial_marker_tail(buffer, (CHANNEL_OPEN, CHANNEL_CLOSE))
                out.append(buffer[:len(buffer) - keep])
                self.held = buffer[len(buffer) - keep:]
                break
            out.append(buffer[:at])
            buffer = buffer[at + len(marker):]
            if self.in_channel:
                self.in_channel = False
            else:
                self.in_channel, self.in_label, self.label = True, True, ""
        return "".join(reasoning), "".join(content)

    def _read_label(self, buffer: str) -> str:
        """Consume the channel label up to its newline; returns what follows it."""
        text, self.label = self.label + buffer, ""
        newline, close = text.find("\n"), text.find(CHANNEL_CLOSE)
        end = min(i for i in (newline, close) if i >= 0) if max(newline, close) >= 0 else -1
        if 0 <= end <= _MAX_LABEL:
            self.in_label = False
            return text[end + 1:] if end == newline else text[end:]  # `thought<channel|>`: empty channel
        if end > _MAX_LABEL or len(text) > _MAX_LABEL + len(CHANNEL_CLOSE):
            self.in_label = False  # no label after all: what was read is reasoning
            return text
        self.label = text  # wait for the newline
        return ""

    def flush(self) -> tuple[str, str]:
        """The end of the output: a held tail was not a marker after all."""
        held, self.held = self.held, ""
        if self.in_label:  # the output ended inside the label: nothing of it is reasoning
            self.in_label, self.label = False, ""
            return "", ""
        return (held, "") if self.in_channel else ("", held)
