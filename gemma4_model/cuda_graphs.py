"""Steps as replayed CUDA graphs: decode steps per padded batch size (`DecodeGraphs`), steps
with prompt chunks per padded row count (`ChunkGraphs`).

A decode step (every sequence one query token: no prefill chunk, verify run or media) runs the
same kernels whatever its sequences' lengths, so its forward is captured once per batch size in
`batch_sizes` and replayed: the step's token ids, positions, write slots, page tables and KV
lengths are copied into the graph's fixed input buffers, and a smaller batch is padded to the
next captured size. Padding rows are position 0 with a KV length of 1, reading and writing one
page per layer group that `DecodeGraphs` reserves from the pool for them (so it never holds any
sequence's KV). The outputs (logits and final-norm hidden states) are copied out of the graph's
buffers, which the next replay overwrites.

A step with prompt chunks (a prefill, alone or beside decodes) launches some hundred kernels per
layer group eagerly, which costs the host tens of milliseconds whatever its size. `ChunkGraphs`
captures `TextDecoder.final_hidden` (no lm_head) over a fixed number of rows and of sequences
(`ChunkInputs`); past the last KV-owning layer one row per sequence goes on (its row with
logits, or its last; a fixed narrowed batch whose layout never changes): the step's rows come first, a padding sequence
owns the rest (position 0, KV length 1, the scratch page), sequences past the step's hold no
rows, and the attention kernels' schedules have a fixed width whose unused programs find no
rows. Soft tokens are spliced from a fixed buffer of a row's worth each (unused entries land on a
sink row of the padding sequence) and bidirectional spans live in a fixed span buffer, so
multimodal prompts replay too. The lm_head then runs outside the graph on the rows that want
logits.

Needs the decoder's Triton attention (`TextDecoder.set_kernels(True)`): the PyTorch twin reads
batch lengths on the host, which a graph cannot (with the kernels, mixture-of-experts layers
run as grouped matrix products over device-side routing, `kernels.moe`). `DecodeGraphs.run`
answers None for a batch it cannot replay; the engine then runs the forward eagerly.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import torch

from .batch import ForwardBatch, GroupView, RaggedLayout, on_device, schedule_entries
from .decoder import DecoderOutput, TextDecoder
from .kv_cache import NO_PAGE, PagedKVCache

# steps of 8-16 up to 128: a running batch near 100 pads to 104-112, not 128 (each size keeps its
# own logits buffer, so not every size)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
DEFAULT_TOKEN_SIZES = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def capture_sizes(max_batch: int, sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> tuple[int, ...]:
    """The batch sizes to capture for decode batches of up to `max_batch` sequences (or the row
    counts for steps of up to that many rows, given `DEFAULT_TOKEN_SIZES`)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    chosen = [s for s in sizes if s < max_batch]
    return (*chosen, max_batch)


def can_capture(model: TextDecoder) -> str | None:
    """Why this model's forward cannot be captured, or None."""
    if not model.kernels:
        return "the PyTorch attention reads batch lengths on the host (turn the kernels on)"
    if not next(model.parameters()).is_cuda:
        return "CUDA graphs need a CUDA device"
    return None


@dataclass
class _Graph:
    size: int
    graph: torch.cuda.CUDAGraph
    batch: ForwardBatch  # the fixed input buffers, as a batch
    out: DecoderOutput  # the fixed output buffers


class _CapturedSteps:
    """What both kinds of captured steps share: a scratch page per group that only padding rows
    touch, one capture per size (largest first, the smaller ones reusing its memory pool) and
    `close`. A subclass sets what its captures need, then calls `_capture_all`."""

    kind = ""

    def __init__(self, model: TextDecoder, cache: PagedKVCache, sizes: Sequence[int], max_model_len: int):
        problem = can_capture(model)
        if problem is not None:
            raise ValueError(f"cannot capture {self.kind} graphs: {problem}")
        self.model, self.cache = model, cache
        self.sizes = tuple(sorted(set(sizes)))
        self.device = next(model.parameters()).device
        self.max_pages = -(-max_model_len // cache.page_size)
        self.max_model_len = max_model_len
        self.scratch = {name: group.pool.allocate() for name, group in cache.groups.items()}
        self.replays = 0
        self._graphs: dict = {}

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._graphs[size] = self._capture(size, pool)

    def _capture(self, size: int, pool):
        raise NotImplementedError

    def close(self) -> None:
        """Drop the graphs and give the scratch pages back."""
        self._graphs.clear()
        for name, page in self.scratch.items():
            self.cache.groups[name].pool.release_all([page])
        self.scratch = {}


class DecodeGraphs(_CapturedSteps):
    """Captured decode forwards of `model` over `cache`, one per size in `sizes`."""

    kind = "decode"

    def __init__(self, model: TextDecoder, cache: PagedKVCache, sizes: Sequence[int], max_model_len: int):
        super().__init__(model, cache, sizes, max_model_len)
        self._capture_all()

    def _static_batch(self, size: int) -> ForwardBatch:
        device, page = self.device, self.cache.page_size
        groups = {}
        for name in self.cache.groups:
            tables = torch.full((size, self.max_pages), NO_PAGE, dtype=torch.long, device=device)
            tables[:, 0] = self.scratch[name]
            slots = torch.full((size,), self.scratch[name] * page, dtype=torch.long, device=device)
            groups[name] = GroupView(tables, slots)
        batch = ForwardBatch(
            token_ids=torch.zeros(size, dtype=torch.long, device=device),
            positions=torch.zeros(size, dtype=torch.long, device=device),
            query_starts=tuple(range(size + 1)),
            # host lengths only size the kernels' launch (flash-decoding splits for the longest
            # context); the replayed lengths live in the layout's tensors
            kv_lens=(self.max_model_len,) * size,
            chunk_starts=(0,) * size,
            chunk_spans=(None,) * size,
            groups=groups,
            logits_rows=torch.arange(size, dtype=torch.long, device=device),
            page_size=page,
        )
        layout = batch.layout  # built now, from the host lengths: its tensors are the graph's inputs
        layout.kv_lens.fill_(1)
        return batch

    @torch.inference_mode()  # as Engine.step runs the forward
    def _capture(self, size: int, pool) -> _Graph:
        batch = self._static_batch(size)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels
                self.model(batch, self.cache)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.model(batch, self.cache)
        return _Graph(size, graph, batch, out)

    def size_for(self, batch: ForwardBatch) -> int | None:
        """The captured size this batch replays at, or None when it cannot be replayed."""
        b = batch.num_seqs
        if batch.query_starts != tuple(range(b + 1)) or batch.media_rows is not None:
            return None  # not one token per sequence, or soft tokens to splice
        if any(s is not None for s in batch.chunk_spans) or batch.logits_rows.numel() != b:
            return None
        if any(g.page_tables.shape[1] > self.max_pages for g in batch.groups.values()):
            return None
        return next((s for s in self.sizes if s >= b), None)

    def run(self, batch: ForwardBatch) -> DecoderOutput | None:
        """Replay the graph of the batch's size (padded); None when the batch is not a plain
        decode step of at most the largest captured size."""
        size = self.size_for(batch)
        if size is None:
            return None
        g, b = self._graphs[size], batch.num_seqs
        s = g.batch
        s.token_ids[:b].copy_(batch.token_ids)
        s.positions[:b].copy_(batch.positions)
        s.positions[b:].zero_()
        for name, view in batch.groups.items():
            fixed, scratch = s.groups[name], self.scratch[name]
            fixed.write_slots[:b].copy_(view.write_slots)
            fixed.write_slots[b:].fill_(scratch * self.cache.page_size)
            width = view.page_tables.shape[1]
            fixed.page_tables[:b, :width].copy_(view.page_tables)
            fixed.page_tables[:b, width:].fill_(NO_PAGE)
            fixed.page_tables[b:].fill_(NO_PAGE)
            fixed.page_tables[b:, 0].fill_(scratch)
        layout = s.layout
        kv = torch.tensor(batch.kv_lens, dtype=torch.int32).to(self.device, non_blocking=True)
        layout.kv_lens[:b].copy_(kv)
        layout.kv_lens[b:].fill_(1)
        layout.chunk_starts[:b].copy_(kv - 1)
        layout.chunk_starts[b:].zero_()
        g.graph.replay()
        self.replays += 1
        return DecoderOutput(logits=g.out.logits[:b].clone(), hidden=g.out.hidden[:b].clone())


def logits_seqs(batch: ForwardBatch) -> list[int]:
    """The sequence of each of the batch's logits rows (known on the host)."""
    return [bisect_right(batch.query_starts, row) - 1 for row in batch.host_logits_rows]


class ChunkInputs:
    """The fixed input batch of a forward over up to `rows` query rows of at most `max_seqs`
    sequences, soft tokens and bidirectional spans included, and the copy of a step's batch into
    it (see the module doc: padding sequence last).

    One row more than `rows` always belongs to the padding sequence: the unused entries of the
    fixed media-row list point at it (all `rows` of them are spliced at every replay). The
    attention schedules exist once a first forward has built them; `fix_schedules` then widens
    them to fixed buffers, which `load` fills."""

    def __init__(self, cache: PagedKVCache, rows: int, max_seqs: int, max_pages: int, scratch: dict[str, int],
                 device: torch.device, hidden: int, dtype: torch.dtype, media: bool = True, narrow: bool = False):
        """`media`: soft tokens can be spliced (the model has a pad id for their rows' token ids);
        `narrow`: past the last KV-owning layer one row per sequence goes on (`narrowed`)."""
        self.rows, self.max_seqs, self.max_pages, self.scratch = rows, max_seqs, max_pages, scratch
        self.media = media
        self.page, self.device = cache.page_size, device
        seqs, total = max_seqs + 1, rows + 1  # the padding sequence last, and its sink row
        groups = {}
        for name in cache.groups:
            tables = torch.full((seqs, max_pages), NO_PAGE, dtype=torch.long, device=device)
            tables[:, 0] = scratch[name]  # the padding sequence's KV; the idle ones' when narrowed
            groups[name] = GroupView(tables, torch.full((total,), scratch[name] * self.page, dtype=torch.long,
                                                        device=device))
        self.batch = ForwardBatch(
            token_ids=torch.zeros(total, dtype=torch.long, device=device),
            positions=torch.zeros(total, dtype=torch.long, device=device),
            query_starts=(0,) * seqs + (total,),  # every row the padding sequence's: prompt-chunk tiles
            kv_lens=(1,) * seqs, chunk_starts=(0,) * seqs,
            # the padding sequence's span ids size the layout's span buffer: a span id per row
            chunk_spans=(None,) * max_seqs + (torch.zeros(total, dtype=torch.int32, device=device),),
            groups=groups, logits_rows=torch.zeros(1, dtype=torch.long, device=device), page_size=self.page,
            media_rows=torch.full((rows,), rows, dtype=torch.long, device=device) if media else None,
            media_embeds=torch.zeros((rows, hidden), dtype=dtype, device=device) if media else None,
        )
        self.schedules: dict[int, torch.Tensor] = {}
        self.narrowed = self._narrowed_batch(seqs) if narrow else None

    def _narrowed_batch(self, seqs: int) -> tuple[torch.Tensor, ForwardBatch]:
        """(rows, batch of those rows) for the KV-shared layers: each sequence's row with logits
        (its last row when it wants none; the sink row for the idle and padding sequences), one
        per sequence, so its layout (decode tiles) never changes; lengths and spans are the full
        batch's tensors, positions a buffer `load` fills."""
        full, device = self.batch, self.device
        going_on = torch.full((seqs,), self.rows, dtype=torch.long, device=device)
        one_each = tuple(range(seqs + 1))
        batch = ForwardBatch(
            token_ids=torch.zeros(seqs, dtype=torch.long, device=device),
            positions=torch.zeros(seqs, dtype=torch.long, device=device),
            query_starts=one_each, kv_lens=(1,) * seqs, chunk_starts=(0,) * seqs, chunk_spans=full.chunk_spans,
            groups={name: GroupView(g.page_tables, torch.zeros(seqs, dtype=torch.long, device=device))
                    for name, g in full.groups.items()},
            logits_rows=torch.arange(seqs, device=device), page_size=self.page,
        )
        layout = full.layout
        batch.__dict__["layout"] = RaggedLayout(  # sharing the full batch's length and span buffers
            query_starts=torch.arange(seqs + 1, dtype=torch.int32, device=device), kv_lens=layout.kv_lens,
            chunk_starts=layout.chunk_starts, span_offsets=layout.span_offsets, span_lens=layout.span_lens,
            spans=layout.spans, max_query_len=1, host_query_starts=one_each)
        return going_on, batch

    def fix_schedules(self) -> None:
        self.schedules = self.batch.layout.fix_schedules()
        seqs = self.max_seqs + 1
        self._load_layout(self.batch.query_starts, (1,) * seqs, (0,) * seqs, (0,) * seqs, (self.rows,) * seqs)

    def fits(self, batch: ForwardBatch) -> bool:
        if self.narrowed is not None and (batch.host_logits_rows is None or len(set(logits_seqs(batch)))
                                          != len(batch.host_logits_rows)):
            return False  # narrowing keeps one row per sequence (not a verify run's)
        return (batch.token_ids.shape[0] <= self.rows and batch.num_seqs <= self.max_seqs
                and (self.media or batch.media_rows is None)
                and all(g.page_tables.shape[1] <= self.max_pages for g in batch.groups.values()))

    def load(self, batch: ForwardBatch) -> list[int] | None:
        """Copy `batch` (which `fits`) in: its rows first, the rest the padding sequence's. When
        narrowing, returns the sequence of each logits row (its row in the narrowed output)."""
        fixed, b, T = self.batch, batch.num_seqs, batch.token_ids.shape[0]
        fixed.token_ids[:T].copy_(batch.token_ids)
        fixed.token_ids[T:].zero_()
        fixed.positions[:T].copy_(batch.positions)
        fixed.positions[T:].zero_()
        for name, view in batch.groups.items():
            group, width = fixed.groups[name], view.page_tables.shape[1]
            group.write_slots[:T].copy_(view.write_slots)
            group.write_slots[T:].fill_(self.scratch[name] * self.page)
            group.page_tables[:b, :width].copy_(view.page_tables)
            group.page_tables[:b, width:].fill_(NO_PAGE)
            group.page_tables[b:].fill_(NO_PAGE)
            group.page_tables[b:, 0].fill_(self.scratch[name])  # a narrowed idle row reads its key 0 there
        if self.media:
            media = 0 if batch.media_rows is None else batch.media_rows.numel()
            if media:
                fixed.media_rows[:media].copy_(batch.media_rows)
                fixed.media_embeds[:media].copy_(batch.media_embeds)
            fixed.media_rows[media:].fill_(self.rows)  # the sink row
        span_lens = [0 if s is None else s.numel() for s in batch.chunk_spans]
        at = 0
        for spans in batch.chunk_spans:
            if spans is not None:
                fixed.layout.spans[at : at + spans.numel()].copy_(spans)
                at += spans.numel()
        idle = self.max_seqs - b
        going_on = [batch.query_starts[i + 1] - 1 for i in range(b)]  # each sequence's row with logits, else its last
        seqs = None if self.narrowed is None else logits_seqs(batch)
        for seq, row in zip(seqs or (), batch.host_logits_rows or ()):
            going_on[seq] = row
        self._load_layout((*batch.query_starts, *(T,) * idle, self.rows + 1), (*batch.kv_lens, *(1,) * (idle + 1)),
                          (*batch.chunk_starts, *(0,) * (idle + 1)), (*span_lens, *(0,) * (idle + 1)),
                          (*going_on, *(self.rows,) * (idle + 1)))
        if self.narrowed is not None:
            rows, narrowed = self.narrowed
            narrowed.positions.copy_(fixed.positions[rows])
        return seqs

    def _load_layout(self, starts: Sequence[int], kv_lens: Sequence[int], chunk_starts: Sequence[int],
                     span_lens: Sequence[int], going_on: Sequence[int]) -> None:
        """The row offsets, KV lengths, chunk starts, span offsets and lengths, the rows going on
        past the KV-owning layers (when narrowing) and the schedules, in one host-to-device copy."""
        layout, seqs = self.batch.layout, self.max_seqs + 1
        values = [*starts, *kv_lens, *chunk_starts, 0, *accumulate(span_lens[:-1]), *span_lens]
        narrowed = () if self.narrowed is None else (self.narrowed[0],)
        if narrowed:
            values += going_on
        for block, buf in self.schedules.items():
            entries, rows = schedule_entries(starts, block)
            idle = buf.shape[1] - len(entries)  # programs that find no rows: the padding sequence's end
            values += [*entries, *(seqs - 1,) * idle, *rows, *(self.rows + 1,) * idle]
        packed = on_device(values, self.device, torch.int32)
        at = 0
        for buf in (layout.query_starts, layout.kv_lens, layout.chunk_starts, layout.span_offsets, layout.span_lens,
                    *narrowed, *self.schedules.values()):
            buf.copy_(packed[at : at + buf.numel()].view(buf.shape))
            at += buf.numel()


@dataclass
class _ChunkGraph:
    rows: int
    graph: torch.cuda.CUDAGraph
    inputs: ChunkInputs
    hidden: torch.Tensor  # the fixed output buffer: [rows + 1, hidden], or a row per sequence when narrowed


class ChunkGraphs(_CapturedSteps):
    """Captured forwards of steps with prompt chunks, one per row count in `sizes`, for steps of
    at most `max_seqs` sequences."""

    kind = "prompt-chunk"

    def __init__(self, model: TextDecoder, cache: PagedKVCache, sizes: Sequence[int], max_seqs: int,
                 max_model_len: int):
        super().__init__(model, cache, sizes, max_model_len)
        self.max_seqs = max_seqs
        self._capture_all()

    @torch.inference_mode()
    def _capture(self, rows: int, pool) -> _ChunkGraph:
        weight, cfg = self.model.embed_tokens.weight, self.model.cfg
        inputs = ChunkInputs(self.cache, rows, self.max_seqs, self.max_pages, self.scratch, self.device,
                             weight.shape[1], weight.dtype, media=cfg.pad_token_id is not None,
                             narrow=cfg.first_shared_layer < cfg.num_layers)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.model.final_hidden(inputs.batch, self.cache, inputs.narrowed)  # builds the schedules; Triton compiles
            inputs.fix_schedules()
            self.model.final_hidden(inputs.batch, self.cache, inputs.narrowed)  # cuBLAS picks its kernels
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = self.model.final_hidden(inputs.batch, self.cache, inputs.narrowed)
        return _ChunkGraph(rows, graph, inputs, hidden)

    def run(self, batch: ForwardBatch) -> DecoderOutput | None:
        """Replay the graph of the fewest rows that hold the batch; None when none fits (more
        rows than the largest size, more sequences than `max_seqs`, or soft tokens for a model
        without a pad id)."""
        size = next((s for s in self.sizes if s >= batch.token_ids.shape[0]), None)
        g = None if size is None else self._graphs[size]
        if g is None or not g.inputs.fits(batch):
            return None
        seqs = g.inputs.load(batch)
        g.graph.replay()
        self.replays += 1
        # narrowed: the output has a row per sequence
        hidden = g.hidden[batch.logits_rows if seqs is None else on_device(seqs, self.device)]
        return DecoderOutput(logits=self.model.head(hidden), hidden=hidden)
