"""Decode steps as replayed CUDA graphs: one captured decoder forward per padded batch size.

A decode step (every sequence one query token: no prefill chunk, verify run or media) runs the
same kernels whatever its sequences' lengths, so its forward is captured once per batch size in
`batch_sizes` and replayed: the step's token ids, positions, write slots, page tables and KV
lengths are copied into the graph's fixed input buffers, and a smaller batch is padded to the
next captured size. Padding rows are position 0 with a KV length of 1, reading and writing one
page per layer group that `DecodeGraphs` reserves from the pool for them (so it never holds any
sequence's KV). The outputs (logits and final-norm hidden states) are copied out of the graph's
buffers, which the next replay overwrites.

Needs the decoder's Triton attention (`TextDecoder.set_kernels(True)`): the PyTorch twin reads
batch lengths on the host, which a graph cannot. Mixture-of-experts layers loop over the
experts a step routes to on the host, so MoE models run eagerly until their grouped kernel
lands. `DecodeGraphs.run` answers None for a batch it cannot replay; the engine then runs the
forward eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .batch import ForwardBatch, GroupView
from .decoder import DecoderOutput, TextDecoder
from .kv_cache import NO_PAGE, PagedKVCache

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def capture_sizes(max_batch: int, sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> tuple[int, ...]:
    """The batch sizes to capture for decode batches of up to `max_batch` sequences."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    chosen = [s for s in sizes if s < max_batch]
    return (*chosen, max_batch)


def can_capture(model: TextDecoder) -> str | None:
    """Why this model's forward cannot be captured, or None."""
    if not model.kernels:
        return "the PyTorch attention reads batch lengths on the host (turn the kernels on)"
    if model.cfg.moe is not None:
        return "the MoE layers pick their experts on the host"
    if not next(model.parameters()).is_cuda:
        return "CUDA graphs need a CUDA device"
    return None


@dataclass
class _Graph:
    size: int
    graph: torch.cuda.CUDAGraph
    batch: ForwardBatch  # the fixed input buffers, as a batch
    out: DecoderOutput  # the fixed output buffers


class DecodeGraphs:
    """Captured decode forwards of `model` over `cache`, one per size in `sizes`."""

    def __init__(self, model: TextDecoder, cache: PagedKVCache, sizes: Sequence[int], max_model_len: int):
        problem = can_capture(model)
        if problem is not None:
            raise ValueError(f"cannot capture decode graphs: {problem}")
        self.model, self.cache = model, cache
        self.sizes = tuple(sorted(set(sizes)))
        self.device = next(model.parameters()).device
        self.max_pages = -(-max_model_len // cache.page_size)
        self.max_model_len = max_model_len
        # a page per group that only padding rows touch
        self.scratch = {name: group.pool.allocate() for name, group in cache.groups.items()}
        self.replays = 0
        self._graphs: dict[int, _Graph] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
            self._graphs[size] = self._capture(size, pool)

    def close(self) -> None:
        """Drop the graphs and give the scratch pages back."""
        self._graphs.clear()
        for name, page in self.scratch.items():
            self.cache.groups[name].pool.release_all([page])
        self.scratch = {}

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

