"""In-process generation: a scheduler doing chunked prefill and continuous batching over the
paged cache, and an engine that runs its steps through the decoder.

The actors wrap these pieces; the demo and the parity tests drive them directly.
"""

from __future__ import annotations

from collections import abc
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Sequence

import numpy as np
import torch

from .batch import ForwardBatch, SequenceChunk, on_device
from .cuda_graphs import DEFAULT_TOKEN_SIZES, ChunkGraphs, DecodeGraphs, capture_sizes
from .decoder import DecoderOutput, TextDecoder
from .grammar import GrammarBook, GrammarState
from .kv_cache import PagedKVCache, RequestTooLargeError
from .media_span import (MediaSpan, MediaTokens, bidirectional_blocks, chunk_media, chunk_span_ids, page_extra_keys,
                         validate_media)
from .sampling import LOGPROBS_RAW, RowSample, Sampler, SamplingParams, SamplingRow
from .speculative import Drafter, verify_position

# An output slot whose token a launched step has not reported yet (overlap scheduling).
PLACEHOLDER = -1

# An MTP assistant drafting at q reads the sliding KV of q-1-window .. q-1: two positions more
# than the target's own next step, which may hold one more token (a verify run).
DRAFT_REACH_BACK = 2


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class GenerationSequence:
    """One request's state across steps."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_cached_prompt_tokens: int = 0  # reused from the prefix cache at the last admission
    num_computed_tokens: int = 0  # positions run through the model (prefill and decode), all attempts
    step_logits: list[torch.Tensor] = field(default_factory=list)
    # One entry per token this engine sampled, when params.logprobs is not None (a prefilled
    # sequence's first token was sampled, and reported, by the prefill engine).
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[np.ndarray] = field(default_factory=list)  # int32 [k] each, best first
    top_logprobs: list[np.ndarray] = field(default_factory=list)  # float32 [k] each
    request_id: str | None = None  # the caller's name for it (actors use the API request id)
    grammar: GrammarState | None = None  # structured output: its matcher, synced with `output`
    # Multimodal prompts: soft tokens by prompt position, kept until the sequence finishes (a
    # preempted sequence re-splices them when it is recomputed).
    media: tuple[MediaSpan, ...] = ()
    blocks: tuple[tuple[int, int], ...] = ()  # [start, end) bidirectional spans: one forward each
    page_keys: tuple[bytes, ...] = ()  # per full prompt page, the content keys of its media
    new_tokens: list[int] = field(default_factory=list)  # tokens emitted in the latest step that advanced it
    # The target's final-norm hidden state [hidden] of the position that produced output[-1]
    # (what an MTP drafter reads); None until this engine samples a token for it.
    last_hidden: torch.Tensor | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def token_view(self) -> "TokenView":
        """`tokens` as a read-only view: length and slices without building the list."""
        return TokenView(self)

    @property
    def num_reported(self) -> int:
        """Output tokens the host knows: `output` but a trailing PLACEHOLDER (a launched step's)."""
        return len(self.output) - (1 if self.output and self.output[-1] == PLACEHOLDER else 0)

    @property
    def num_tokens(self) -> int:
        """len(tokens), without building the list."""
        return len(self.prompt) + len(self.output)

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end], without building the whole list."""
        p = len(self.prompt)
        if start >= p:
            return self.output[start - p:end - p]
        return self.prompt[start:end] + self.output[:max(0, end - p)]


class TokenView(abc.Sequence):
    """A sequence's prompt + output, read in place (the cache hashes only a growing sequence's
    new pages: building the whole list each step would cost more than that)."""

    __slots__ = ("_seq",)

    def __init__(self, seq: GenerationSequence):
        self._seq = seq

    def __len__(self) -> int:
        return self._seq.num_tokens

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self._seq.token_slice(start, stop) if step == 1 else self._seq.tokens[index]
        prompt = self._seq.prompt
        if index < 0:
            index += len(self)
        return prompt[index] if index < len(prompt) else self._seq.output[index - len(prompt)]


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_tokens: int = 512  # query tokens per step (prefill chunks + decodes)
    max_running: int = 64
    chunk_size: int = 256  # longest prefill chunk of one sequence per step
    # the longest a sequence (prompt + output) may grow, at most the model's max_position_embeddings
    # (SGLang's context_length, vLLM's max_model_len); None: the model's
    max_model_len: int | None = None


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[SequenceChunk, ...]
    seqs: tuple[GenerationSequence, ...]
    samples: tuple[bool, ...]  # whether this chunk ends at the sequence's next token
    drafts: tuple[int, ...] = ()  # per chunk: draft positions reserved after its newest token (0: none)


_Verify = tuple[list[int], "torch.Tensor | None"]  # a verify run's drafts and their q rows (None: one-hot)


@dataclass
class _Pending:
    """A sequence that gets tokens this step: its first logits row and the drafts it verifies."""

    seq: GenerationSequence
    row: int
    drafts: list[int]
    q: torch.Tensor | None  # [len(drafts), vocab] draft distributions, None: deterministic drafter


@dataclass
class _Launched:
    """A decode step launched before the previous one's tokens reached the host (overlap
    scheduling): its sequences, the output slot each token fills, and the tokens themselves on
    the device (the next step's input) and on their way to the host."""

    seqs: tuple[GenerationSequence, ...]
    slots: tuple[int, ...]  # index into each seq.output of its placeholder
    ends: tuple[int, ...]  # per sequence: positions computed once this step is done
    tokens: torch.Tensor  # [B] long, on the device
    host: torch.Tensor  # [B] long on the host (pinned on CUDA), filled by an async copy
    event: "torch.cuda.Event | None"  # recorded after that copy (None on the CPU: already done)
    hidden: torch.Tensor  # [B, hidden] final-norm hidden states


def overlappable(params: SamplingParams) -> bool:
    """Whether a request's tokens can be sampled without the host seeing its previous token:
    no grammar (its mask follows each token), no penalties (they count the output), no logprobs
    and no kept logits (read on the host each step)."""
    return params.grammar is None and not params.penalised and params.logprobs is None and not params.keep_logits


class Scheduler:
    """Chooses each step's chunks; admits, preempts (by recompute) and retires sequences."""

    def __init__(self, cache: PagedKVCache, limits: SchedulerLimits, max_model_len: int):
        self.cache = cache
        self.limits = limits
        self.max_model_len = max_model_len
        self.waiting: list[GenerationSequence] = []
        self.running: list[GenerationSequence] = []
        self.num_speculative_tokens = 0  # draft positions a decoding sequence may verify per step
        self.draft_context = False  # keep the sliding KV an MTP assistant reads (here or after a handoff)

    def add(self, seq: GenerationSequence) -> None:
        """Queue a sequence, or refuse it at once if it can never fit."""
        total = len(seq.prompt) + seq.params.max_tokens
        if not seq.prompt:
            raise ValueError("a prompt needs at least one token")
        if total > self.max_model_len:
            raise RequestTooLargeError(f"prompt + max_tokens = {total} exceeds the model length {self.max_model_len}")
        longest_block = max((hi - lo for lo, hi in seq.blocks), default=0)
        self.cache.check_fits(total, max(self.limits.chunk_size, longest_block))
        self.waiting.append(seq)

    def adopt(self, seq: GenerationSequence) -> None:
        """Run a sequence whose prompt KV is already in the cache (it arrived by KV handoff)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        budget = self.limits.max_batch_tokens
        plan: list[tuple[GenerationSequence, int]] = []  # (sequence, tokens this step)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop to make room
            if self.last_in_flight(seq):
                continue  # overlap: its last token is being computed; it finishes when reported
            start = self.cache.num_computed(seq.seq_id)
            n = self._chunk_length(seq, start, budget, alone=not plan)
            if start == seq.num_tokens - 1 and seq.output:  # decoding: room for its drafts too
                n = min(1 + self.draft_limit(seq), budget)
                self.cache.slide(seq.seq_id, self._keep_from(start))
                if n > 1 and not self.cache.can_extend([(seq.seq_id, start + n)]):
                    n = 1  # no drafts this step rather than preempting another sequence for them
            if n == 0:  # a whole bidirectional span does not fit the budget left: first in line next step
                self.running.remove(seq)
                self.running.insert(0, seq)
                continue
            if not self._make_room(seq, n, plan):
                continue  # seq itself was preempted
            plan.append((seq, n))
            budget = max(0, budget - n)
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_running:
            seq = self.waiting[0]
            cached = self.cache.add_sequence(seq.seq_id, seq.tokens, seq.page_keys, seq.blocks)
            n = self._chunk_length(seq, cached, budget, alone=not plan)
            self.cache.slide(seq.seq_id, cached)
            if n and not self.cache.can_extend([(seq.seq_id, cached + n)]):
                self.cache.free_sequence(seq.seq_id)
                break  # wait for pages to come free
            self.waiting.pop(0)
            seq.status = Status.RUNNING
            seq.num_cached_prompt_tokens = cached
            if n == 0:  # its first chunk, a whole bidirectional span, exceeds the budget left:
                self.running.insert(0, seq)  # admitted without a chunk, first in line next step
                break
            self.running.append(seq)
            self.cache.extend(seq.seq_id, cached + n)
            plan.append((seq, n))
            budget = max(0, budget - n)
        chunks, seqs, samples, drafts = [], [], [], []
        for seq, n in plan:
            start = self.cache.num_computed(seq.seq_id)
            end = min(start + n, seq.num_tokens)
            chunks.append(SequenceChunk(seq.seq_id, seq.token_slice(start, end), start,
                                        span_ids=chunk_span_ids(seq.blocks, start, end),
                                        media=chunk_media(seq.media, start, end)))
            seqs.append(seq)
            samples.append(end == seq.num_tokens)
            drafts.append(start + n - end)
        return StepPlan(tuple(chunks), tuple(seqs), tuple(samples), tuple(drafts))

    def last_in_flight(self, seq: GenerationSequence) -> bool:
        """Whether the token a launched step is computing for `seq` (overlap scheduling) is its
        last: it reaches max_tokens or the model length, so nothing more runs for it."""
        return bool(seq.output) and seq.output[-1] == PLACEHOLDER and (
            len(seq.output) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len)

    def draft_limit(self, seq: GenerationSequence) -> int:
        """Draft tokens a decoding sequence may verify this step: at most `num_speculative_tokens`,
        and never so many that accepting all of them plus the bonus token passes max_tokens or
        the model length."""
        left = min(seq.params.max_tokens - len(seq.output), self.max_model_len - seq.num_tokens)
        return max(0, min(self.num_speculative_tokens, left - 1))

    def _chunk_length(self, seq: GenerationSequence, start: int, budget: int, alone: bool) -> int:
        """Tokens of seq's next chunk from `start`; 0 when it cannot run this step.

        A chunk never ends inside a bidirectional span (its tokens must see each other in one
        forward): it stops at the span's start, or, when the span starts the chunk, covers the
        whole span even past `chunk_size` if the budget allows, or past the budget too when it is
        the step's first chunk (so a span longer than `max_batch_tokens` still runs).
        """
        n = min(seq.num_tokens - start, self.limits.chunk_size, budget)
        end = start + n
        for lo, hi in seq.blocks:
            if lo < end < hi:
                if lo > start:
                    return lo - start
                assert lo == start, f"sequence {seq.seq_id}: a chunk starts inside the span {lo}..{hi - 1}"
                need = hi - start
                return need if need <= budget or alone else 0
        return n

    def _keep_from(self, start: int) -> int:
        """Where sliding pages may be released from (`reach_back` before the next step's start)."""
        return max(0, start - self.reach_back)

    @property
    def reach_back(self) -> int:
        """Sliding positions kept beyond the target's own window (those an assistant reads)."""
        return DRAFT_REACH_BACK if self.draft_context else 0

    def _make_room(self, seq: GenerationSequence, n: int, plan: list) -> bool:
        """Pages for seq's next n tokens, preempting the newest other sequences if needed."""
        start = self.cache.num_computed(seq.seq_id)
        self.cache.slide(seq.seq_id, self._keep_from(start))
        while not self.cache.can_extend([(seq.seq_id, start + n)]):
            victim = self.running[-1]
            self._preempt(victim)
            plan[:] = [(s, k) for s, k in plan if s is not victim]
            if victim is seq:
                return False
        self.cache.extend(seq.seq_id, start + n)
        return True

    def _preempt(self, seq: GenerationSequence) -> None:
        self.running.remove(seq)
        self.cache.free_sequence(seq.seq_id)
        seq.status = Status.WAITING
        self.waiting.insert(0, seq)

    def finish(self, seq: GenerationSequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.media = ()  # soft tokens are needed no more (no recompute can follow)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.cache.has_sequence(seq.seq_id):
            self.cache.free_sequence(seq.seq_id)


@dataclass
class EngineStats:
    """Counters of what the engine has run (for tests and metrics)."""

    steps: int = 0
    mixed_steps: int = 0  # steps holding both prefill chunks and decode tokens
    prefill_tokens: int = 0
    decode_tokens: int = 0  # query tokens of decoding sequences, drafts included
    drafted_tokens: int = 0  # draft tokens verified by the target
    accepted_tokens: int = 0  # draft tokens accepted (emitted as output)
    verify_runs: int = 0  # sequence-steps that verified at least one draft

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 before any draft)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accept_length(self) -> float:
        """Drafts accepted per verify run (tokens emitted per run is this + 1, but for stops)."""
        return self.accepted_tokens / self.verify_runs if self.verify_runs else 0.0


class Engine:
    """Runs scheduled steps through the decoder and samples; offline `generate` for demos/tests."""

    def __init__(self, model: TextDecoder, cache: PagedKVCache, limits: SchedulerLimits = SchedulerLimits(),
                 seed: int | None = None, logprobs_mode: str = LOGPROBS_RAW, grammars: GrammarBook | None = None,
                 media_tokens: MediaTokens | None = None, drafter: Drafter | None = None,
                 num_speculative_tokens: int = 4, draft_context: bool = False, overlap: bool = False):
        """`drafter`: speculative decoding (see `speculative.py`), each decoding sequence verifying
        up to `num_speculative_tokens` drafts per step; None decodes one token per step.
        `draft_context`: keep the KV an assistant reads even without a drafter here (a prefill
        actor whose decode actor drafts). `overlap`: overlap scheduling, see `step`."""
        if num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {num_speculative_tokens}")
        self.model = model
        # Placeholder ids of media (default: the checkpoint's, from the decoder's config).
        self.media_tokens = media_tokens if media_tokens is not None else MediaTokens.from_text_config(model.cfg)
        self.grammars = grammars  # None: requests with a grammar are refused
        self.cache = cache
        longest = model.cfg.max_position_embeddings
        self.scheduler = Scheduler(cache, limits, min(longest, limits.max_model_len or longest))
        self.drafter = drafter
        self.scheduler.num_speculative_tokens = num_speculative_tokens if drafter is not None else 0
        self.scheduler.draft_context = drafter is not None or draft_context
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        # seed: the noise of requests without their own seed
        self.sampler = Sampler(model.cfg.eos_token_ids, seed, logprobs_mode, self.device)
        self._next_id = 0
        self.graphs: DecodeGraphs | None = None  # captured decode steps (`capture_decode_graphs`)
        self.chunk_graphs: ChunkGraphs | None = None  # captured prompt-chunk steps (`capture_chunk_graphs`)
        self.overlap = overlap
        self._launched: _Launched | None = None  # a decode step whose tokens the host has not seen

    def capture_decode_graphs(self, max_batch: int | None = None) -> DecodeGraphs:
        """Replay plain decode steps of up to `max_batch` sequences (default: the scheduler's
        `max_running`) as CUDA graphs; other steps run eagerly. ValueError where the model cannot
        be captured (see `cuda_graphs.can_capture`)."""
        if self.graphs is not None:
            self.graphs.close()
        sizes = capture_sizes(max_batch or self.scheduler.limits.max_running)
        self.graphs = DecodeGraphs(self.model, self.cache, sizes, self.scheduler.max_model_len)
        return self.graphs

    def capture_chunk_graphs(self, max_rows: int | None = None) -> ChunkGraphs:
        """Replay steps with prompt chunks (prefills, alone or beside decodes) of up to `max_rows`
        query rows (default: the scheduler's token budget) and `max_running` sequences as CUDA
        graphs, padded to the next captured row count (multimodal prompts too; verify runs of
        several logits rows per sequence stay eager on models with KV-shared layers)."""
        if self.chunk_graphs is not None:
            self.chunk_graphs.close()
        limits = self.scheduler.limits
        sizes = capture_sizes(max_rows or limits.max_batch_tokens, DEFAULT_TOKEN_SIZES)
        self.chunk_graphs = ChunkGraphs(self.model, self.cache, sizes, limits.max_running, self.scheduler.max_model_len)
        return self.chunk_graphs

    def _forward(self, batch: ForwardBatch) -> DecoderOutput:
        """The batch's forward: a captured graph's replay where one holds it, else eager."""
        for graphs in (self.graphs, self.chunk_graphs):
            out = graphs.run(batch) if graphs is not None else None
            if out is not None:
                return out
        return self.model(batch, self.cache)

    def add_request(self, prompt: Sequence[int], params: SamplingParams, request_id: str | None = None,
                    media: Sequence[MediaSpan] = ()) -> GenerationSequence:
        """Queue a request. `prompt` keeps the placeholder ids where `media` (soft tokens) go;
        ValueError if a span does not match the prompt (see `validate_media`)."""
        seq = GenerationSequence(self._next_id, list(prompt), params, request_id=request_id)
        self._attach_media(seq, media)
        seq.grammar = self._grammar_state(params, seq.output)
        self._next_id += 1
        self.scheduler.add(seq)
        return seq

    def add_prefilled(self, prompt: Sequence[int], first_token: int, params: SamplingParams,
                      install, request_id: str | None = None, media: Sequence[MediaSpan] = (),
                      last_hidden: torch.Tensor | None = None) -> GenerationSequence:
        """Continue a request prefilled elsewhere: `install(cache, seq_id)` puts its KV pages in
        this engine's cache (a KV handoff), then it decodes from its first token. `media` are
        the prompt's soft tokens, needed if the sequence is preempted and recomputed here;
        `last_hidden` the target's final-norm hidden state that produced the first token (a
        drafter drafts from it at once; without it drafting starts one token later)."""
        seq = GenerationSequence(self._next_id, list(prompt), params, output=[first_token], request_id=request_id,
                                 last_hidden=last_hidden)
        self._attach_media(seq, media)
        seq.grammar = self._grammar_state(params, seq.output)  # rebuilt from the first token
        self._next_id += 1
        install(self.cache, seq.seq_id)
        self.scheduler.adopt(seq)
        return seq

    def _attach_media(self, seq: GenerationSequence, media: Sequence[MediaSpan]) -> None:
        cfg = self.model.cfg
        seq.media = validate_media(seq.prompt, media, self.media_tokens, cfg.hidden_size, cfg.pad_token_id)
        # Variants without bidirectional spans attend causally: their images may be split.
        seq.blocks = bidirectional_blocks(seq.media) if cfg.span_attention != "none" else ()
        seq.page_keys = page_extra_keys(seq.media, len(seq.prompt), self.cache.page_size)

    def _grammar_state(self, params: SamplingParams, output: Sequence[int]) -> GrammarState | None:
        """A matcher for a constrained request, fed its output so far (raises GrammarError, a
        ValueError, for a grammar that cannot compile or an engine without grammar support)."""
        if params.grammar is None:
            return None
        if self.grammars is None:
            raise ValueError("this engine was started without structured-output support")
        stops = list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.model.cfg.eos_token_ids))
        state = self.grammars.start(params.grammar, stops)
        state.sync(output)
        return state

    def cancel(self, seq: GenerationSequence) -> None:
        """Drop a sequence wherever it is (waiting or running) and free its pages now (a step
        still running on the device may write them: later steps on its stream come after it)."""
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, "cancelled")
        while seq.output and seq.output[-1] == PLACEHOLDER:
            seq.output.pop()

    def has_work(self) -> bool:
        """Sequences to run, or a launched step whose tokens are still to be reported."""
        return self._launched is not None or self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[GenerationSequence]:
        """One forward over the planned chunks; returns the sequences that got tokens: one, or
        with speculation up to k+1 (`new_tokens`, the tail of `output`); `status` says whether
        the last of them finished it.

        With `overlap`, a step whose requests are all `overlappable` (and no drafter) is launched
        without waiting for its tokens: the next call launches the following step (decodes,
        admissions, prefill chunks), the decode rows' input tokens taken on the device from the
        launched step's, and only then reports the launched step's tokens (so the host's work of
        one step hides under the device's work of the next). A launched step's token is a
        PLACEHOLDER in `output` until reported; a sequence that stops on a token drops the step
        computed after it; one whose launched token is its last (length limit) sits out the step
        launched after it. A step that might preempt or a request that is not overlappable first
        reports the launched step.
        """
        if self._launched is not None:
            return self._step_ahead()
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        if self.overlap and self._runs_ahead(plan):
            self._launched = self._launch(plan, None)
            return []
        chunks, verifies = self._add_drafts(plan)
        batch = ForwardBatch.build(chunks, self.cache, self.device)
        out = self._forward(batch)
        self._count(plan, chunks)
        pending, row = [], 0
        for i, (seq, chunk, sampled) in enumerate(zip(plan.seqs, chunks, plan.samples)):
            end = chunk.start + len(chunk.token_ids)
            seq.num_computed_tokens += len(chunk.token_ids)
            if verifies[i] is None:  # a verify run commits once its drafts are judged
                self.cache.commit(seq.seq_id, seq.token_view, end, seq.page_keys)
            if sampled:
                drafts, q = verifies[i] or ([], None)
                pending.append(_Pending(seq, row, drafts, q))
            row += len(chunk.logits_rows)
        advanced = self._emit(out, pending)
        for seq, verify in zip(plan.seqs, verifies):
            if verify is not None and seq.status is Status.RUNNING:
                # KV of rejected drafts is dropped; the newest token is computed next step.
                self.cache.truncate(seq.seq_id, seq.num_tokens - 1)
                self.cache.commit(seq.seq_id, seq.token_view, seq.num_tokens - 1, seq.page_keys)
        return advanced

    def _runs_ahead(self, plan: StepPlan) -> bool:
        """Whether a planned step may be launched without waiting for its tokens."""
        return self.drafter is None and all(overlappable(seq.params) and len(chunk.logits_rows) == 1
                                            for seq, chunk in zip(plan.seqs, plan.chunks))

    def _can_follow(self, prev: _Launched) -> bool:
        """Whether the next step may launch before `prev` reports: every request overlappable,
        no bidirectional span left to prefill, and the pages every running sequence may take
        this step free (so nothing is preempted while a token is unreported). A sequence whose
        unreported token is its last (length limit) sits the next step out
        (`Scheduler.last_in_flight`): the others run on."""
        scheduler = self.scheduler
        if self.drafter is not None or not all(overlappable(s.params) for s in scheduler.waiting):
            return False
        needs = []
        for seq in scheduler.running:
            if not overlappable(seq.params):
                return False
            computed = self.cache.num_computed(seq.seq_id)
            if seq.blocks and computed < len(seq.prompt):
                return False  # a whole span may take more than chunk_size positions
            needs.append((seq.seq_id, min(seq.num_tokens, computed + scheduler.limits.chunk_size)))
        return self.cache.can_extend(needs)

    def _step_ahead(self) -> list[GenerationSequence]:
        prev, self._launched = self._launched, None
        if self._can_follow(prev):
            plan = self.scheduler.schedule()
            if plan.chunks:
                assert self._runs_ahead(plan)
                self._launched = self._launch(plan, prev)
        return self._report(prev)

    def _launch(self, plan: StepPlan, prev: _Launched | None) -> _Launched:
        """Run a step and sample it on the device; its tokens are not awaited. A decode row
        whose input is still a PLACEHOLDER takes prev's token for its sequence on the device."""
        batch = ForwardBatch.build(plan.chunks, self.cache, self.device)
        unknown = [(i, seq) for i, (seq, chunk) in enumerate(zip(plan.seqs, plan.chunks))
                   if chunk.token_ids[-1] == PLACEHOLDER]
        if unknown:
            assert prev is not None and all(len(plan.chunks[i].token_ids) == 1 for i, _ in unknown)
            row = {s.seq_id: r for r, s in enumerate(prev.seqs)}
            rows = [batch.query_starts[i] for i, _ in unknown]
            taken = [row[seq.seq_id] for _, seq in unknown]
            if rows == list(range(len(prev.seqs))) == taken and len(rows) == batch.token_ids.shape[0]:
                tokens = prev.tokens  # a plain decode step of the same sequences
            else:
                tokens = batch.token_ids.index_copy(0, on_device(rows, self.device),
                                                    prev.tokens[on_device(taken, self.device)])
            batch = replace(batch, token_ids=tokens)
        out = self._forward(batch)
        self._count(plan, plan.chunks)
        sampled = [i for i, s in enumerate(plan.samples) if s]
        seqs = tuple(plan.seqs[i] for i in sampled)
        rows = [SamplingRow(s.params, s.prompt, s.output) for s in seqs]
        logits = out.logits if len(sampled) == len(plan.chunks) else out.logits[on_device(sampled, self.device)]
        tokens = self.sampler.tokens(logits, rows) if seqs else out.logits.new_empty(0, dtype=torch.long)
        on_cuda = tokens.is_cuda
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=on_cuda)
        host.copy_(tokens, non_blocking=on_cuda)
        event = None
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
        slots, ends = [], []
        for seq, chunk, sample in zip(plan.seqs, plan.chunks, plan.samples):
            end = chunk.start + len(chunk.token_ids)
            seq.num_computed_tokens += len(chunk.token_ids)
            if not sample:  # a prefill chunk short of the prompt's end: its tokens are all known
                self.cache.commit(seq.seq_id, seq.token_view, end, seq.page_keys)
                continue
            self.cache.mark_computed(seq.seq_id, end)  # its pages are published once reported
            slots.append(len(seq.output))
            ends.append(end)
            seq.output.append(PLACEHOLDER)
        hidden = out.hidden if len(sampled) == len(plan.chunks) else out.hidden[on_device(sampled, self.device)]
        return _Launched(seqs, tuple(slots), tuple(ends), tokens, host, event, hidden)

    def _report(self, launched: _Launched) -> list[GenerationSequence]:
        """Wait for a launched step's tokens and record them as the plain step would have."""
        if launched.event is not None:
            launched.event.synchronize()
        advanced = []
        for r, (seq, slot, end, token) in enumerate(zip(launched.seqs, launched.slots, launched.ends,
                                                        launched.host.tolist())):
            if seq.status is Status.FINISHED:  # cancelled, or stopped at the token before this one
                continue
            seq.output[slot] = token
            seq.new_tokens = [token]
            seq.last_hidden = launched.hidden[r]
            self.cache.publish(seq.seq_id, seq.token_view, end, seq.page_keys)
            reason = self._finish_reason(seq, token, slot + 1)
            if reason:
                del seq.output[slot + 1:]  # a step launched after this token is void
                self.scheduler.finish(seq, reason)
            advanced.append(seq)
        return advanced

    def _add_drafts(self, plan: StepPlan) -> tuple[list[SequenceChunk], list[_Verify | None]]:
        """The step's chunks with each decoding sequence's drafts appended (a verify run, logits
        at every position), and per chunk its (drafts, draft probs) or None when it verifies none."""
        chunks = list(plan.chunks)
        verifies: list = [None] * len(chunks)
        wanting = [i for i, n in enumerate(plan.drafts) if n > 0]
        if not wanting or self.drafter is None:
            return chunks, verifies
        proposal = self.drafter.draft(self.cache, [plan.seqs[i] for i in wanting], max(plan.drafts[i] for i in wanting))
        assert len(proposal.tokens) == len(wanting), "the drafter must answer for every sequence"
        vocab = self.model.cfg.vocab_size
        for i, tokens, q in zip(wanting, proposal.tokens, proposal.probs):
            tokens = [int(t) for t in tokens[: plan.drafts[i]]]
            assert all(0 <= t < vocab for t in tokens), f"draft tokens outside the vocabulary: {tokens}"
            chunk = chunks[i]
            chunks[i] = replace(chunk, token_ids=list(chunk.token_ids) + tokens,
                                logits_rows=tuple(range(1 + len(tokens))))
            verifies[i] = (tokens, None if q is None else q[: len(tokens)].to(self.device, torch.float32))
        return chunks, verifies

    def _emit(self, out: DecoderOutput, pending: list["_Pending"]) -> list[GenerationSequence]:
        """Judge drafts position by position and emit tokens: each round, every sequence still
        going gets one token (`verify_position`: the accepted draft, a correction, or the plain /
        bonus token), recorded before the next round so penalties, min_tokens, seeded noise and
        the grammar see exactly the output a plain decode would have at that position."""
        for p in pending:
            p.seq.new_tokens = []
        active, j = list(pending), 0
        while active:
            seqs = [p.seq for p in active]
            bitmask, constrained = self._grammar_masks(seqs)
            rows = [p.row + j for p in active]
            results = verify_position(
                out.logits[rows], [SamplingRow(s.params, s.prompt, s.output, c) for s, c in zip(seqs, constrained)],
                [p.drafts[j] if j < len(p.drafts) else None for p in active],
                [p.q[j] if p.q is not None and j < len(p.drafts) else None for p in active],
                self.sampler.eos_token_ids, self.sampler.generator, self.sampler.logprobs_mode, bitmask)
            going = []
            for p, r, (choice, accepted) in zip(active, rows, results):
                seq = p.seq
                if seq.params.keep_logits:
                    seq.step_logits.append(out.logits[r].float().cpu())
                self._record(seq, choice)
                seq.new_tokens.append(choice.token)
                seq.last_hidden = out.hidden[r].clone()
                self.stats.accepted_tokens += accepted
                if seq.grammar is not None:
                    seq.grammar.sync(seq.output)
                reason = self._finish_reason(seq, choice.token)
                if reason:
                    self.scheduler.finish(seq, reason)
                elif accepted:
                    going.append(p)
            active, j = going, j + 1
        return [p.seq for p in pending]

    def _grammar_masks(self, seqs: Sequence[GenerationSequence]) -> tuple[torch.Tensor | None, list[bool]]:
        """This step's token bitmask for the constrained rows, filled in one call."""
        states = [s.grammar for s in seqs]
        if self.grammars is None or all(g is None for g in states):
            return None, [False] * len(seqs)
        return self.grammars.fill(states)

    @staticmethod
    def _record(seq: GenerationSequence, choice: RowSample) -> None:
        seq.output.append(choice.token)
        if choice.logprob is not None:
            seq.logprobs.append(choice.logprob)
            seq.top_ids.append(choice.top_ids)
            seq.top_logprobs.append(choice.top_logprobs)

    def _count(self, plan: StepPlan, chunks: Sequence[SequenceChunk]) -> None:
        decode = [chunk.start >= len(seq.prompt) for seq, chunk in zip(plan.seqs, chunks)]
        self.stats.steps += 1
        self.stats.mixed_steps += any(decode) and not all(decode)
        for is_decode, chunk, plain in zip(decode, chunks, plan.chunks):
            drafted = len(chunk.token_ids) - len(plain.token_ids)
            self.stats.drafted_tokens += drafted
            self.stats.verify_runs += drafted > 0
            if is_decode:
                self.stats.decode_tokens += len(chunk.token_ids)
            else:
                self.stats.prefill_tokens += len(chunk.token_ids)

    def _finish_reason(self, seq: GenerationSequence, token: int, length: int | None = None) -> str | None:
        """Why the sequence ends at `token`, its `length`-th output token (default: the last)."""
        p = seq.params
        length = len(seq.output) if length is None else length
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.model.cfg.eos_token_ids):
            return "stop"
        if seq.grammar is not None and seq.grammar.terminated:
            return "stop"  # the grammar is complete (and needed no stop token): nothing else may follow
        if length >= p.max_tokens or len(seq.prompt) + length >= self.scheduler.max_model_len:
            return "length"
        return None

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationSequence]:
        """Run prompts to completion together (continuous batching) and return their sequences."""
        seqs = [self.add_request(p, params) for p in prompts]
        while self.has_work():
            self.step()
        return seqs
