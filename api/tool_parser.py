"""Gemma 4 tool calls in model output, parsed incrementally into OpenAI `tool_calls`.

The model writes `<|tool_call>call:NAME{ARGS}<tool_call|>`, possibly several in a row, after
optional ordinary text. ARGS is Gemma's own syntax: comma-separated `key:value` with bare keys
(or keys quoted like strings), strings between two `<|"|>` tokens (any character inside, no
escaping), numbers / `true` / `false` / `null` bare, objects `{...}` and arrays `[...]`.

`ToolCallParser.feed(text)` takes text deltas (decoded with the markers kept) and returns a
`ToolParse`: the content delta and `ToolCallDelta`s in OpenAI's streaming shape. A call's first
delta carries its index, a fresh id (`call_<hex>`) and its name with arguments ""; then argument
fragments follow, each ending where a value is complete (a string once closed, a bare number or
word once a `,` `}` or `]` ends it), so their concatenation is the JSON text of the arguments and
no fragment is ever taken back. Decisions depend only on the text, never on how it was split.

Malformed output never raises. Before a call's name is announced (no `call:`, a bad name) the
marker and its text go to the content. After that a call cannot be retracted (OpenAI's stream
has no way to), so an error in its arguments, or the output ending inside it, closes it with the
values completed so far (the JSON stays valid) and the rest of its raw text becomes content.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

from .reasoning import partial_marker_tail

CALL_OPEN = "<|tool_call>"
CALL_CLOSE = "<tool_call|>"
QUOTE = '<|"|>'
CALL_PREFIX = "call:"
MAX_NAME = 256
MAX_DEPTH = 64
_NAME = re.compile(r"[^\s{}\[\]<>,:\"']+")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_BARE_END = ",}]"
_WORDS = {"true": "true", "false": "false", "null": "null"}
_SETTLES = frozenset(",{}[]>")  # only text with one of these can complete, open or close an item


@dataclass
class ToolCallDelta:
    """One streaming delta of one call: the first has id and name, the rest argument text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def openai(self) -> dict:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolParse:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _Incomplete(Exception):
    """The text ends before the current item does."""


class _Malformed(Exception):
    """The text cannot be Gemma arguments from here on."""


class _ArgsScan:
    """One pass over the text after a call's `{`: the JSON of every item completed so far.

    `out` grows only when an item is complete, so the JSON of a longer text always extends the
    JSON of a shorter one; `committed` is the raw position just after the last completed item
    and `closers` the brackets still open in `out`.
    """

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.out = ["{"]
        self.closers = ["}"]
        self.committed = 0
        self.end: int | None = None  # raw position after the top-level `}`

    def run(self) -> None:
        self._members()
        self.end = self.pos

    # --- helpers ----------------------------------------------------------------------------
    def _commit(self, *parts: str) -> None:
        self.out.extend(parts)
        self.committed = self.pos

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        if self.pos >= len(self.text):
            raise _Incomplete

    def _quoted(self) -> str:
        """A `<|"|>...<|"|>` string at pos (pos is at its opening quote)."""
        close = self.text.find(QUOTE, self.pos + len(QUOTE))
        if close < 0:
            raise _Incomplete
        value = self.text[self.pos + len(QUOTE):close]
        self.pos = close + len(QUOTE)
        return value

    def _starts_quote(self) -> bool:
        rest = self.text[self.pos:self.pos + len(QUOTE)]
        if rest == QUOTE:
            return True
        if rest.startswith("<"):
            if QUOTE.startswith(rest):
                raise _Incomplete
            raise _Malformed
        return False

    # --- grammar ----------------------------------------------------------------------------
    def _members(self) -> None:
        """An object's members up to and including its `}`."""
        self._items("}", lambda sep: self._value(sep, json.dumps(self._key(), ensure_ascii=False) + ": "))

    def _items(self, closer: str, item) -> None:
        """Comma-separated items (a trailing comma allowed) up to and including `closer`;
        `item(separator)` parses one and emits it after the JSON separator."""
        first = True
        while True:
            self._skip_space()
            if self.text[self.pos] == closer:
                self.pos += 1
                self.closers.pop()
                self._commit(closer)
                return
            if not first:
                if self.text[self.pos] != ",":
                    raise _Malformed
                self.pos += 1
                self._skip_space()
                if self.text[self.pos] == closer:  # a trailing comma
                    continue
            item(", " if not first else "")
            first = False

    def _key(self) -> str:
        if self._starts_quote():
            key = self._quoted()
            self._skip_space()
            if self.text[self.pos] != ":":
                raise _Malformed
            self.pos += 1
            return key
        start = self.pos
        while True:
            if self.pos >= len(self.text):
                raise _Incomplete
            ch = self.text[self.pos]
            if ch == ":":
                break
            if ch in ",{}[]<":
                raise _Malformed
            self.pos += 1
        key = self.text[start:self.pos].strip()
        self.pos += 1
        if not key:
            raise _Malformed
        return key

    def _elements(self) -> None:
        """An array's elements up to and including its `]`."""
        self._items("]", lambda sep: self._value(sep, ""))

    def _value(self, separator: str, key: str) -> None:
        """One value; `separator` and `key` are written with it once it is complete (or opened)."""
        self._skip_space()
        ch = self.text[self.pos]
        if ch in "{[":
            if len(self.closers) >= MAX_DEPTH:
                raise _Malformed
            self.pos += 1
            self.closers.append("}" if ch == "{" else "]")
            self._commit(separator, key, ch)
            self._members() if ch == "{" else self._elements()
            return
        if self._starts_quote():
            value = self._quoted()
            self._commit(separator, key, json.dumps(value, ensure_ascii=False))
            return
        start = self.pos
        while True:
            if self.pos >= len(self.text):
                raise _Incomplete  # a bare value may still grow until something ends it
            c = self.text[self.pos]
            if c in _BARE_END:
                break
            if c in "{[<:":
                raise _Malformed
            self.pos += 1
        self._commit(separator, key, _bare(self.text[start:self.pos].strip()))


def _bare(word: str) -> str:
    """A bare value as JSON: literals and numbers as they are, anything else as a string."""
    if not word:
        raise _Malformed
    if word in _WORDS:
        return _WORDS[word]
    if _JSON_NUMBER.fullmatch(word):
        return word
    try:
        number = float(word)
    except ValueError:
        return json.dumps(word, ensure_ascii=False)
    if not math.isfinite(number):
        return json.dumps(word, ensure_ascii=False)
    return str(int(number)) if number.is_integer() and re.fullmatch(r"[+-]?\d+", word) else json.dumps(number)


class ToolCallParser:
    """`feed(text) -> ToolParse`; `flush()` at the end of the output. `calls` counts the calls
    announced so far."""

    def __init__(self, id_factory: Callable[[], str] = new_call_id):
        self.id_factory = id_factory
        self.calls = 0
        self.held = ""  # text not yet decided (a possible marker start, or the current call's text)
        self.in_call = False
        self.announced = False  # the current call's id and name were sent
        self.sent = ""  # argument JSON sent for the current call
        self.args_from = 0  # where the current call's arguments start in `held`
        self.scanned = 0  # length of the current call's text at its last scan

    def feed(self, text: str) -> ToolParse:
        return self._run(self.held + text, final=False)

    def flush(self) -> ToolParse:
        return self._run(self.held, final=True)

    def _run(self, buffer: str, final: bool) -> ToolParse:
        result = ToolParse()
        content: list[str] = []
        self.held = ""
        while buffer:
            if not self.in_call:
                at = buffer.find(CALL_OPEN)
                if at < 0:
                    keep = 0 if final else partial_marker_tail(buffer, (CALL_OPEN,))
                    content.append(buffer[:len(buffer) - keep])
                    self.held = buffer[len(buffer) - keep:]
                    break
                content.append(buffer[:at])
                buffer = buffer[at + len(CALL_OPEN):]
                self.in_call, self.announced, self.sent, self.scanned = True, False, "", 0
                continue
            buffer = self._call(buffer, final, result, content)
            if self.in_call:  # waiting for more text
                break
        result.content = "".join(content)
        return result

    def _call(self, text: str, final: bool, result: ToolParse, content: list[str]) -> str:
        """Advance the current call over `text` (its whole raw text after the open marker).
        Returns the text left for the content state once the call is over, else keeps it held."""
        if not self.announced:
            status, value = _header(text)
            if status == "wait" and not final:
                self.held = text
                return ""
            if status != "ok":  # not a call after all: the marker and its text are content
                self.in_call = False
                content.append(CALL_OPEN)
                return text
            name, self.args_from = value
            self.announced = True
            result.calls.append(ToolCallDelta(self.calls, "", self.id_factory(), name))
            self.calls += 1
        index = self.calls - 1
        if not final and self.scanned and _SETTLES.isdisjoint(text[self.scanned:]):
            self.held = text  # nothing new can be complete: skip re-scanning (long strings stay linear-ish)
            return ""
        self.scanned = len(text)
        scan = _ArgsScan(text[self.args_from:])
        error = False
        try:
            scan.run()
        except _Incomplete:
            error = final
        except _Malformed:
            error = True
        fragment = "".join(scan.out)
        if scan.end is None and error:
            fragment += "".join(reversed(scan.closers))
        if len(fragment) > len(self.sent):
            result.calls.append(ToolCallDelta(index, fragment[len(self.sent):]))
            self.sent = fragment
        if scan.end is None and not error:
            self.held = text
            return ""
        self.in_call = False
        if error:  # the call is closed as it is; the rest of its raw text is content
            return text[self.args_from + scan.committed:]
        rest = text[self.args_from + scan.end:]
        stripped = rest.lstrip()
        if stripped.startswith(CALL_CLOSE):
            return stripped[len(CALL_CLOSE):]
        if CALL_CLOSE.startswith(stripped) and not final:
            self.in_call = True  # the close marker may still come: keep the call open
            self.held = text
            return ""
        return rest


def _header(text: str) -> tuple[str, object]:
    """`call:NAME{` at the start of `text`: ("ok", (name, position after `{`)), "wait" or "bad"."""
    if len(text) < len(CALL_PREFIX):
        return ("wait", None) if CALL_PREFIX.startswith(text) else ("bad", None)
    if not text.startswith(CALL_PREFIX):
        return "bad", None
    brace = text.find("{", len(CALL_PREFIX))
    name = text[len(CALL_PREFIX):brace if brace >= 0 else len(text)]
    if name and not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        return "bad", None
    if brace < 0:
        return "wait", None
    if not name:
        return "bad", None
    return "ok", (name, brace + 1)
