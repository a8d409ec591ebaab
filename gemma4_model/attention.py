"""Paged attention in plain PyTorch: the CPU path and the oracle for the GPU kernels.

Queries of a ragged batch attend to KV gathered from the paged cache through each sequence's
page table. Masks: causal; sliding layers see the previous `window` positions (the query's own
included). Tokens of one span (an image) also see each other where the model says so: Gemma 4
on sliding layers only and inside the window; the unified family on every layer, the span
overriding the window (see `TextConfig.span_attention`).
"""

from __future__ import annotations

import torch

from .batch import ForwardBatch
from .kv_cache import KVGroup


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K or V in the cache's dtype; an FP8 (e4m3) cache saturates at its largest finite value
    (explicitly, so every device's cast agrees). Gemma 4's K and V are RMS-normed: no scale is
    kept."""
    if dtype == torch.float8_e4m3fn:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def write_kv(group: KVGroup, slot: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store new tokens' K and V [T, kv_heads, head_dim] at flat cache slots."""
    kv_heads, head_dim = group.k.shape[-2:]
    group.k[slot].view(-1, kv_heads, head_dim)[slots] = to_cache(k, group.k.dtype)
    group.v[slot].view(-1, kv_heads, head_dim)[slots] = to_cache(v, group.v.dtype)


def attention_mask(
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    window: int | None,
    q_span: torch.Tensor | None = None,
    kv_span: torch.Tensor | None = None,
    span_overrides_window: bool = False,
) -> torch.Tensor:
    """Boolean [q, kv]: which cached positions each query may attend to."""
    diff = q_pos[:, None] - kv_pos[None, :]
    allowed = diff >= 0
    in_window = None if window is None else diff < window
    if in_window is not None:
        allowed = allowed & in_window
    if q_span is not None and kv_span is not None:
        same_span = (q_span[:, None] == kv_span[None, :]) & (q_span[:, None] > 0)
        if in_window is not None and not span_overrides_window:
            same_span = same_span & in_window
        allowed = allowed | same_span
    return allowed


def paged_attention(
    q: torch.Tensor,
    group: KVGroup,
    slot: int,
    batch: ForwardBatch,
    layer_type: str,
    span_mode: str = "none",
) -> torch.Tensor:
    """q [T, heads, head_dim] -> output [T, heads, head_dim]; softmax scale 1 (q, k are normed).

    `span_mode`: "none", "windowed" (spans see each other inside the window) or "override"
    (spans see each other whatever the window).
    """
    kv_heads, head_dim = group.k.shape[-2:]
    k_flat = group.k[slot].view(-1, kv_heads, head_dim)
    v_flat = group.v[slot].view(-1, kv_heads, head_dim)
    tables = batch.groups[layer_type].page_tables
    page = batch.page_size
    out = torch.empty_like(q)
    rep = q.shape[1] // kv_heads
    for b in range(batch.num_seqs):
        lo, hi = batch.query_starts[b], batch.query_starts[b + 1]
        if lo == hi:
            continue
        q_pos = batch.positions[lo:hi]
        spans = batch.chunk_spans[b] if span_mode != "none" else None
        first = 0
        if group.window is not None:
            first = max(0, int(q_pos.min()) - group.window + 1)
            if spans is not None and span_mode == "override":
                first = min(first, batch.chunk_starts[b])  # a span may reach past the window
        kv_pos = torch.arange(first, batch.kv_lens[b], device=q.device)
        slots = tables[b, kv_pos // page] * page + kv_pos % page
        k = k_flat[slots].to(q.dtype).repeat_interleave(rep, dim=1)  # [L, heads, d]
        v = v_flat[slots].to(q.dtype).repeat_interleave(rep, dim=1)
        q_span = kv_span = None
        if spans is not None:
            start = batch.chunk_starts[b]
            q_span = spans[q_pos - start]
            kv_span = torch.zeros_like(kv_pos)
            in_chunk = kv_pos >= start
            kv_span[in_chunk] = spans[kv_pos[in_chunk] - start]
        mask = attention_mask(q_pos, kv_pos, group.window, q_span, kv_span, span_mode == "override")
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi], k).float()
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", probs, v)
    return out
