"""The ragged batch one decoder forward runs over: flat tokens, no padding.

Each sequence contributes a contiguous run of query tokens at consecutive positions (a prefill
chunk, one decode token, or k+1 verify tokens); prefill chunks and decode steps mix freely.
`ForwardBatch.build` turns a list of `SequenceChunk`s and the cache's page tables into the
tensors the attention reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import accumulate
from typing import Sequence

import torch

from .kv_cache import NO_PAGE, PagedKVCache


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's part of a step: tokens at positions start .. start+len-1."""

    seq_id: int
    token_ids: Sequence[int]
    start: int
    logits_rows: Sequence[int] = (-1,)  # rows of this chunk (negative: from the end) to return logits for
    span_ids: Sequence[int] | None = None  # >0 marks tokens of one bidirectional span (an image)
    # Soft tokens spliced over placeholder rows: (offset in this chunk, rows [n, hidden]) each.
    media: Sequence[tuple[int, torch.Tensor]] = ()


@dataclass(frozen=True)
class GroupView:
    """Where one layer type's KV lives for this batch."""

    page_tables: torch.Tensor  # [B, max_pages] int64, NO_PAGE where nothing is held
    write_slots: torch.Tensor  # [T] flat slot (page * page_size + offset) per query token


def on_device(values, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list (or tensor) as a tensor on `device`, copied without waiting for the device's
    queue: `torch.tensor(values, device=cuda)` and a plain `.to` synchronise with it, where a
    non-blocking copy of pageable memory is staged at once."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return t.to(device, non_blocking=True)


@dataclass(frozen=True)
class ForwardBatch:
    """Flat query tokens of several sequences plus what attention needs to find their KV."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    query_starts: tuple[int, ...]  # B+1 offsets into the T rows
    kv_lens: tuple[int, ...]  # per sequence: positions in cache after this step
    chunk_starts: tuple[int, ...]  # per sequence: first position of its chunk
    chunk_spans: tuple[torch.Tensor | None, ...]  # per sequence: span id of each chunk position
    groups: dict[str, GroupView]
    logits_rows: torch.Tensor  # indices into T
    page_size: int
    media_rows: torch.Tensor | None = None  # [M] rows of T whose embedding is a soft token
    media_embeds: torch.Tensor | None = None  # [M, hidden] those soft tokens, in row order
    host_logits_rows: tuple[int, ...] | None = None  # logits_rows on the host (None: read them back)

    @property
    def num_seqs(self) -> int:
        return len(self.kv_lens)

    @cached_property
    def layout(self) -> "RaggedLayout":
        """The batch's ragged layout as small int32 device tensors, built once per batch."""
        return RaggedLayout.of(self)

    @staticmethod
    def build(chunks: Sequence[SequenceChunk], cache: PagedKVCache, device: torch.device | str = "cpu") -> "ForwardBatch":
        """Assemble a batch; the cache must already hold pages for every chunk's positions."""
        for c in chunks:
            if c.span_ids is not None and len(c.span_ids) != len(c.token_ids):
                raise ValueError(f"sequence {c.seq_id}: span_ids and token_ids differ in length")
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        tokens: list[int] = []
        positions: list[int] = []
        starts = [0]
        kv_lens = []
        rows: list[int] = []
        media_rows: list[int] = []
        media_embeds: list[torch.Tensor] = []
        for c in chunks:
            n = len(c.token_ids)
            if n == 0:
                raise ValueError(f"sequence {c.seq_id} has no tokens in this step")
            for offset, embeds in c.media:
                if offset < 0 or offset + embeds.shape[0] > n:
                    raise ValueError(f"sequence {c.seq_id}: media rows {offset}..{offset + embeds.shape[0] - 1} "
                                     f"outside its chunk of {n}")
                media_rows.extend(range(starts[-1] + offset, starts[-1] + offset + embeds.shape[0]))
                media_embeds.append(embeds)
            tokens.extend(int(t) for t in c.token_ids)
            positions.extend(range(c.start, c.start + n))
            rows.extend(starts[-1] + (r % n) for r in c.logits_rows)
            starts.append(starts[-1] + n)
            kv_lens.append(c.start + n)
        groups = {}
        P = cache.page_size
        for name in cache.groups:
            tables = [cache.page_table(c.seq_id, name) for c in chunks]
            width = max(1, max(len(t) for t in tables))
            slots = []
            for c, table in zip(chunks, tables):
                for pos in range(c.start, c.start + len(c.token_ids)):
                    page = table[pos // P]
                    assert page != NO_PAGE, f"sequence {c.seq_id} holds no {name} page for position {pos}"
                    slots.append(page * P + pos % P)
            padded = [table + [NO_PAGE] * (width - len(table)) for table in tables]  # one tensor, not one per row
            groups[name] = GroupView(on_device(padded, device), on_device(slots, device))
        return ForwardBatch(
            token_ids=on_device(tokens, device),
            positions=on_device(positions, device),
            query_starts=tuple(starts),
            kv_lens=tuple(kv_lens),
            chunk_starts=tuple(c.start for c in chunks),
            chunk_spans=tuple(
                None if c.span_ids is None else on_device(list(c.span_ids), device)
                for c in chunks
            ),
            groups=groups,
            logits_rows=on_device(rows, device),
            page_size=P,
            media_rows=on_device(media_rows, device) if media_rows else None,
            media_embeds=torch.cat([e.to(device) for e in media_embeds]) if media_embeds else None,
            host_logits_rows=tuple(rows),
        )

    def rows_with_logits(self) -> tuple[torch.Tensor, list[int]]:
        """The distinct logits rows, sorted, on the device and on the host (without a device sync
        when the batch knows them on the host)."""
        if self.host_logits_rows is None:
            rows = self.logits_rows.unique(sorted=True)
            return rows, rows.tolist()
        keep = sorted(set(self.host_logits_rows))
        return on_device(keep, self.logits_rows.device), keep

    def select_rows(self, rows: torch.Tensor, host_rows: Sequence[int] | None = None) -> "ForwardBatch":
        """The same batch restricted to some query rows (sorted), e.g. only rows that need logits.

        KV-shared layers write nothing, so after the last KV-owning layer only the rows whose
        outputs are wanted have to go on; the rest of each sequence stays visible through the cache.
        """
        row_list = list(host_rows) if host_rows is not None else rows.tolist()
        starts = [0]
        for b in range(self.num_seqs):
            lo, hi = self.query_starts[b], self.query_starts[b + 1]
            starts.append(starts[-1] + sum(1 for r in row_list if lo <= r < hi))
        remap = {r: i for i, r in enumerate(row_list)}
        logits = self.host_logits_rows if self.host_logits_rows is not None else self.logits_rows.tolist()
        kept = [remap[r] for r in logits]
        return replace(
            self,
            token_ids=self.token_ids[rows],
            positions=self.positions[rows],
            query_starts=tuple(starts),
            groups={n: replace(g, write_slots=g.write_slots[rows]) for n, g in self.groups.items()},
            logits_rows=on_device(kept, rows.device),
            host_logits_rows=tuple(kept),
            media_rows=None,  # spliced at the input already
            media_embeds=None,
        )


@dataclass(frozen=True)
class RaggedLayout:
    """A batch's ragged layout as int32 tensors on its device, for kernels (built once per batch).

    Everything a kernel needs past the page tables and positions lives in tensors, so a decode
    step can keep them in fixed buffers (fixed batch size) and replay a captured graph.
    `spans` holds every sequence's chunk span ids end to end (one 0 when none has any); a
    sequence without spans has span_lens 0.
    """

    query_starts: torch.Tensor  # [B+1]
    kv_lens: torch.Tensor  # [B]
    chunk_starts: torch.Tensor  # [B]
    span_offsets: torch.Tensor  # [B] into spans
    span_lens: torch.Tensor  # [B]
    spans: torch.Tensor  # [S]
    max_query_len: int
    host_query_starts: tuple[int, ...]  # the same offsets on the host, to build schedules
    _schedules: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def of(batch: ForwardBatch) -> "RaggedLayout":
        device = batch.positions.device
        lens = [0 if s is None else int(s.shape[0]) for s in batch.chunk_spans]
        offsets = [0, *accumulate(lens)][:-1]
        B = batch.num_seqs
        packed = on_device([*batch.query_starts, *batch.kv_lens, *batch.chunk_starts, *offsets, *lens], device,
                           torch.int32)
        present = [s.to(device, torch.int32) for s in batch.chunk_spans if s is not None]
        spans = torch.cat(present) if present else torch.zeros(1, dtype=torch.int32, device=device)
        q = batch.query_starts
        return RaggedLayout(
            query_starts=packed[: B + 1], kv_lens=packed[B + 1 : 2 * B + 1],
            chunk_starts=packed[2 * B + 1 : 3 * B + 1], span_offsets=packed[3 * B + 1 : 4 * B + 1],
            span_lens=packed[4 * B + 1 :], spans=spans,
            max_query_len=max(q[b + 1] - q[b] for b in range(B)), host_query_starts=q,
        )

    def schedule(self, block_tokens: int) -> torch.Tensor:
        """[2, programs] int32: (sequence, first row) of each block of up to `block_tokens` query
        rows; each sequence's rows split into blocks, in sequence order. Cached per block size."""
        if block_tokens not in self._schedules:
            self._schedules[block_tokens] = on_device(list(schedule_entries(self.host_query_starts, block_tokens)),
                                                      self.kv_lens.device, torch.int32)
        return self._schedules[block_tokens]

    def fix_schedules(self) -> dict[int, torch.Tensor]:
        """Replace the schedules built so far by buffers as wide as any batch of at most this
        layout's rows and sequences needs (a block per `block_tokens` rows plus one per sequence),
        for a captured forward, whose launches keep their grid; the caller fills them. Returns
        them by block size."""
        rows, seqs = self.host_query_starts[-1], len(self.host_query_starts) - 1
        for block in self._schedules:
            width = -(-rows // block) + seqs
            self._schedules[block] = torch.zeros((2, width), dtype=torch.int32, device=self.kv_lens.device)
        return dict(self._schedules)


def schedule_entries(query_starts: Sequence[int], block_tokens: int) -> tuple[list[int], list[int]]:
    """(sequences, first rows) of the blocks of up to `block_tokens` query rows of a ragged batch
    with these row offsets, in sequence order."""
    seqs, rows = [], []
    for b in range(len(query_starts) - 1):
        for r in range(query_starts[b], query_starts[b + 1], block_tokens):
            seqs.append(b)
            rows.append(r)
    return seqs, rows
