"""An EBNF grammar (the "ebnf" grammar kind) that forces a Gemma 4 tool call, for
`tool_choice: "required"` or a named function.

Gemma 4 writes a call as `<|tool_call>call:NAME{ARGS}<tool_call|>`: ARGS is a comma-separated
list of `key:value` with bare keys; a string is wrapped in the `<|"|>` token on both sides;
numbers, `true`, `false` and `null` are bare; objects are `{...}` in the same syntax and arrays
`[...]` (docs: /work/shared/design/gemma4-reference.md, Formats). The grammar follows each
tool's JSON-schema parameters: properties in their declared order, the required ones always,
the others optional; enums of strings become their alternatives. A string may hold anything but
`<|` (which would start a special token). xgrammar matches the special tokens' text, so the
model's own `<|tool_call>` / `<|"|>` ids are allowed where the grammar says.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

QUOTE = '<|"|>'
_BASE_RULES = r'''
str_body ::= ([^<] | "<" [^|])*
gstring ::= "<|\"|>" str_body "<|\"|>"
gnumber ::= "-"? ([0-9] | [1-9] [0-9]*) ("." [0-9]+)? ([eE] [+-]? [0-9]+)?
ginteger ::= "-"? ([0-9] | [1-9] [0-9]*)
gbool ::= "true" | "false"
gkey ::= [A-Za-z_] [A-Za-z0-9_]*
gvalue ::= gstring | gnumber | gbool | "null" | gobject | garray
gobject ::= "{" (gkey ":" gvalue ("," gkey ":" gvalue)*)? "}"
garray ::= "[" (gvalue ("," gvalue)*)? "]"
'''


def _literal(text: str) -> str:
    return json.dumps(text)  # an EBNF string literal: the same escapes as JSON


class _Rules:
    """Rules named after where they sit in the schemas, written once each."""

    def __init__(self):
        self.lines: list[str] = []
        self.count = 0

    def add(self, body: str, hint: str) -> str:
        self.count += 1
        name = f"r{self.count}_{re.sub(r'[^A-Za-z0-9_]', '_', hint)[:24]}"
        self.lines.append(f"{name} ::= {body}")
        return name

    def value(self, schema: Any, hint: str) -> str:
        """The rule for one value of `schema`."""
        if not isinstance(schema, dict):
            return "gvalue"
        if "enum" in schema:
            options = [QUOTE + v + QUOTE if isinstance(v, str) else json.dumps(v) for v in schema["enum"]]
            return self.add(" | ".join(_literal(o) for o in options), hint)
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.add(" | ".join(self.value({**schema, "type": k}, hint) for k in kind), hint)
        if kind == "string":
            return "gstring"
        if kind == "integer":
            return "ginteger"
        if kind == "number":
            return "gnumber"
        if kind == "boolean":
            return "gbool"
        if kind == "null":
            return '"null"'
        if kind == "array":
            item = self.value(schema.get("items"), hint + "_item")
            return self.add(f'"[" ({item} ("," {item})*)? "]"', hint)
        if kind == "object" and isinstance(schema.get("properties"), dict):
            return self.add(f'"{{" {self.members(schema, hint)} "}}"', hint)
        return "gvalue" if kind is None else ("gobject" if kind == "object" else "gvalue")

    def members(self, schema: dict, hint: str) -> str:
        """`key:value` pairs of an object: declared order, required ones always, commas between."""
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        pairs = [(k in required, f'{_literal(k + ":")} {self.value(v, hint + "_" + k)}') for k, v in props.items()]
        if not pairs:
            return '""'
        # tail_i: the pairs from i on, something already written (so each starts with a comma);
        # head_i: the same with nothing written yet.
        tail = head = '""'
        for needed, pair in reversed(pairs):
            new_tail = self.add(f'"," {pair} {tail}' if needed else f'("," {pair})? {tail}', hint + "_t")
            new_head = self.add(f"{pair} {tail}" if needed else f"({pair} {tail}) | {head}", hint + "_h")
            tail, head = new_tail, new_head
        return head


def forced_tool_call_ebnf(tools: Sequence[dict], name: str | None = None) -> str:
    """EBNF whose `root` is exactly one Gemma 4 call of one of `tools` (OpenAI tool objects), or
    of the function `name` only; raises ValueError for an unknown name or a malformed tool."""
    functions = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("each tool needs a function with a name")
        functions.append(function)
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise ValueError(f"no tool named {name!r}")
    if not functions:
        raise ValueError("a forced tool call needs at least one tool")
    rules = _Rules()
    calls = []
    for function in functions:
        params = function.get("parameters") or {"type": "object", "properties": {}}
        args = rules.members(params, function["name"]) if isinstance(params.get("properties"), dict) else \
            '(gkey ":" gvalue ("," gkey ":" gvalue)*)?'
        calls.append(f'{_literal("<|tool_call>call:" + function["name"] + "{")} {args} {_literal("}<tool_call|>")}')
    root = "root ::= " + " | ".join(f"({c})" for c in calls)
    return "\n".join([root, *rules.lines]) + _BASE_RULES
