"""Structured output by constrained decoding, with xgrammar (the library SGLang and vLLM use).

A request may carry a `GrammarSpec`: a JSON schema or an EBNF grammar (e.g. a forced Gemma 4
tool call, `tool_grammar.py`). The engine owns one `GrammarBook`: the tokenizer's vocabulary as
xgrammar sees it and a bounded cache of compiled grammars keyed on (kind, text). Each
constrained sequence holds a `GrammarState`, an xgrammar `GrammarMatcher` plus how many of its
output tokens the matcher has seen. Each step the engine fills one packed token bitmask
[rows, ceil(vocab / 32)] (int32, bit t of a row set = token t allowed) for every row whose
grammar is active, in one call; the sampler applies it; the chosen token is then accepted.

Thinking: with `after_token_id` set (the `<channel|>` that closes Gemma 4's thinking channel),
the grammar starts after that token, which itself is not fed to the matcher. With
`open_token_id` set too (`<|channel>`, which opens the channel), thinking is optional: the first
token may be that one (then the grammar waits for `after_token_id`) or any token the grammar
allows (then the grammar holds from the start), as a thinking model may skip its thoughts on an
easy question. Because a state
is rebuilt from a sequence's output tokens (`sync`), a decode engine that adopts a request
prefilled elsewhere, or any engine after preemption by recompute, arrives at the same matcher
state as the engine that sampled those tokens.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import xgrammar as xgr

GRAMMAR_KINDS = ("json_schema", "ebnf", "structural_tag")


class GrammarError(ValueError):
    """A grammar that cannot be compiled (a bad schema or EBNF); the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match: `kind` in GRAMMAR_KINDS and its text (a JSON schema,
    an EBNF grammar with a `root` rule, or an xgrammar structural tag as JSON)."""

    kind: str
    text: str
    after_token_id: int | None = None  # the grammar starts after this token (thinking's end)
    open_token_id: int | None = None  # with after_token_id: a first token that opens the free span

    def __post_init__(self):
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {self.kind!r}")


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarState:
    """One sequence's matcher and how far through its output tokens it is."""

    def __init__(self, matcher: xgr.GrammarMatcher, after_token_id: int | None, open_token_id: int | None = None):
        self.matcher = matcher
        self.after_token_id = after_token_id
        self.open_token_id = open_token_id if after_token_id is not None else None
        # "active": the grammar holds; "free": until after_token_id; "either": the first token decides
        self.mode = "active" if after_token_id is None else "free" if open_token_id is None else "either"
        self.seen = 0  # output tokens looked at so far
        self.rejected = False  # a token the grammar did not allow was fed (should not happen)

    @property
    def active(self) -> bool:
        """This step's token is constrained (in mode "either": to the grammar or the open token)."""
        return self.mode != "free"

    def sync(self, output: Sequence[int]) -> None:
        """Feed the output tokens not seen yet (none, in a plain decode step)."""
        for token in output[self.seen:]:
            self.seen += 1
            if self.mode == "either":
                self.mode = "free" if token == self.open_token_id else "active"
            elif self.mode == "free":
                self.mode = "active" if token == self.after_token_id else "free"
                continue
            if self.mode == "active" and not self.matcher.is_terminated() and not self.matcher.accept_token(int(token)):
                self.rejected = True

    @property
    def terminated(self) -> bool:
        """The grammar is complete and has taken its stop token (or needs none): the sequence ends."""
        return self.mode == "active" and (self.rejected or self.matcher.is_terminated())


class GrammarBook:
    """The engine's grammar machinery: vocabulary info, a bounded compiled-grammar cache, and
    the per-step bitmask filling for a batch."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo, vocab_size: int, max_cached: int = 64, threads: int = 2):
        self.info = tokenizer_info
        self.vocab_size = vocab_size
        self.max_cached = max_cached
        self.compiler = xgr.GrammarCompiler(tokenizer_info, max_threads=threads, cache_enabled=False)
        self.compiled: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | str, vocab_size: int, stop_token_ids: Sequence[int],
                        **kwargs) -> "GrammarBook":
        """From the checkpoint's Hugging Face tokenizer; `vocab_size` is the model's (its logits'
        width), which may exceed the tokenizer's: the extra ids are never allowed."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids))
        return cls(info, vocab_size, **kwargs)

    def compile(self, kind: str, text: str) -> xgr.CompiledGrammar:
        """The compiled grammar, from the cache when it is there (least recently used goes first)."""
        key = (kind, text)
        if key in self.compiled:
            self.compiled.move_to_end(key)
            return self.compiled[key]
        try:
            if kind == "json_schema":
                # Compact JSON as json.dumps writes it: unbounded whitespace lets a sampled model ramble.
                grammar = self.compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "ebnf":
                grammar = self.compiler.compile_grammar(text)
            else:
                grammar = self.compiler.compile_structural_tag(text)
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own types
            reason = re.sub(r"^\[[^\]]*\] \S+: ", "", (str(exc).strip().splitlines() or ["unknown error"])[0])
            raise GrammarError(f"cannot compile the {kind}: {reason[:300]}") from None
        self.compiled[key] = grammar
        while len(self.compiled) > self.max_cached:
            self.compiled.popitem(last=False)
        return grammar

    def start(self, spec: GrammarSpec, stop_token_ids: Sequence[int]) -> GrammarState:
        """A fresh state for one sequence; it ends on any of `stop_token_ids` (none: when complete)."""
        compiled = self.compile(spec.kind, spec.text)
        stops = sorted(set(stop_token_ids))
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stops or None,
                                     terminate_without_stop_token=not stops)
        return GrammarState(matcher, spec.after_token_id, spec.open_token_id)

    def fill(self, states: Sequence[GrammarState | None]) -> tuple[torch.Tensor | None, list[bool]]:
        """The packed bitmask [rows, words] for one step (rows without an active grammar all ones)
        and which rows it constrains; (None, all False) when no row is constrained."""
        rows = [i for i, s in enumerate(states) if s is not None and s.active]
        constrained = [False] * len(states)
        if not rows:
            return None, constrained
        bitmask = torch.full((len(states), bitmask_words(self.vocab_size)), -1, dtype=torch.int32)
        self.batch.batch_fill_next_token_bitmask([states[i].matcher for i in rows], bitmask, indices=rows)
        for i in rows:
            constrained[i] = True
            if states[i].mode == "either":  # the thinking channel may open instead
                opener = states[i].open_token_id
                word = int(bitmask[i, opener // 32]) | (1 << (opener % 32))
                bitmask[i, opener // 32] = word - (1 << 32) if word >= 1 << 31 else word
        return bitmask, constrained
