"""Token ids to text, incrementally, and stop strings.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas that are correct
across multi-byte characters split over tokens and merges that change earlier characters: it
decodes a short window of recent ids twice (before and after the new ones) and emits the
difference, holding text back while it ends in an incomplete character (U+FFFD).

`StopStringMatcher` cuts the text at the first stop string (which is never returned) and, while
streaming, holds back any tail that could be the start of one.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
TOKENIZER_ID_LIMIT = 1 << 32  # the `tokenizers` library's ids are u32
CONTEXT_TOKENS = 6  # ids decoded before the unread ones so a merge at the boundary renders right


class IncrementalDetokenizer:
    """`add(ids) -> new text`; `flush() -> whatever was held back` at the end of a request."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust decoder is what `decode` calls without the clean-up; called
        # directly, twice per streamed chunk, it skips transformers' per-call argument handling.
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, ids: list[int]) -> str:
        # The tokenizer renders an unknown id as nothing but cannot even take one outside its
        # unsigned 32-bit range (OverflowError): such ids are dropped the same way.
        self.ids.extend(t for t in ids if 0 <= t < TOKENIZER_ID_LIMIT)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if after.endswith(REPLACEMENT) or len(after) < len(before) or not after.startswith(before):
            return ""  # an incomplete character (or a merge still in flux): wait for more ids
        self.prefix_offset = max(self.read_offset, len(self.ids) - CONTEXT_TOKENS)
        self.read_offset = len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Text of ids still held back (an incomplete character at the very end renders as U+FFFD)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before):] if after.startswith(before) else after


class StopStringMatcher:
    """Feed text deltas; get back the text safe to send and whether a stop string was hit."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self.held + text
        if not self.stops:
            self.held = ""
            return buffer
        # The stop string that is complete first (earliest end; at a tie the longest) ends the
        # text at its start: what streaming token by token sees, so any split gives the same.
        hits = [(i + len(s), i) for s in self.stops if (i := buffer.find(s)) >= 0]
        if hits:
            self.stopped = True
            self.held = ""
            return buffer[:min(hits)[1]]
        keep = self._partial_tail(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """At the end of the request the held tail was not a stop string after all."""
        text, self.held = ("" if self.stopped else self.held), ""
        return text

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:k]):
                    longest = k
                    break
        return longest
