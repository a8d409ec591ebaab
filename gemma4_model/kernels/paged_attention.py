"""Paged attention over a ragged batch in one Triton launch; `attention.paged_attention` is its twin.

Decode rows (one query token), verify runs (k+1) and prefill chunks mix in one batch. A program
takes one block of a sequence's query rows and one KV head: its tile rows are (token, query head
of that KV head's group), so GQA reads each key once for all the heads that share it. Keys are
gathered through the sequence's page table BLOCK_N at a time, masked exactly as
`attention.attention_mask` (causal, sliding window, span modes), and folded into an online
(flash-style) softmax with fp32 accumulation; softmax scale 1. Key blocks wholly below a
sliding window are never visited: the key loop starts at the window's first position.

Head dims up to 512: scores are summed over head-dim chunks of at most 256, and for many-row
tiles the output is split into head-dim slices over programs (each recomputes the scores) so the
accumulator stays in registers. For decode-only batches with few programs per SM the keys of each
sequence are split over `num_splits` programs (flash decoding) and a second kernel merges their
partial results by their log-sum-exp.

The schedule and every length live in int32 tensors (`ForwardBatch.layout`): a decode step of
fixed batch size launches the same grid whatever its sequences' lengths.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..batch import ForwardBatch
from ..kv_cache import KVGroup
from .fused import _pdl_release, _pdl_wait, pdl, tma_capable

SPAN_MODES = {"none": 0, "windowed": 1, "override": 2}
NO_WINDOW = 1 << 30  # a window no sequence reaches: the causal mask alone
_FAR = tl.constexpr(NO_WINDOW)
_LOG2E = tl.constexpr(1.4426950408889634)
# the fewest keys of a flash-decoding split by default (a multiple of 16): splits then hold about one
# 32-key block at batch 1 (H200, E4B at 768 keys, bench/results/attention_sweep_e4b_b1_splits_h200_c945b3a.json:
# sliding layers 8.25 -> 6.0 us against 64-key splits, full layers 11.5 -> 8.6 us over 32 splits)
SPLIT_KEYS = 16
MAX_SPLITS = 32  # the most splits of a decode-like launch on a GPU (a power of two)
FIXED_SPLITS = 16  # the splits at every batch where `DecodeTiles.programs_per_sm` is 0 (the earlier launch)
SPLIT_BLOCK = 32  # keys a split is worth: no more splits than a sliding window holds such blocks


@dataclass(frozen=True)
class DecodeTiles:
    """The launch of decode-like (16-row) tiles: warps, software-pipeline stages, whether V is
    loaded with K, keys per block (0: by head dim), head-dim columns of K per score chunk (0: up to
    256; fewer hold fewer K values in registers at once), the fewest keys of a split (a multiple of
    16: more make fewer, longer splits; the TMA kernel's are whole pages whatever it is), and the
    programs that take a sequence's splits (fewer than the splits: each takes every so-many-th; the
    partition, so the result, is the same), and over an fp8 cache whether the products take
    float16 operands; `block_dv` splits the head dim of V over programs; `tma_stages` reads pure
    decode steps' pages by TMA (`use_tma`); `programs_per_sm` sets the flash-decoding splits by
    batch (`decode_splits`)."""

    # the defaults, from sweeps of 26B-A4B's and E4B's layers at 800 keys on an H100
    # (bench/results/attention_sweep_decode_h100*.json): sliding layers at batches 8 to 96 the
    # fastest launch or within 3% of it (at batch 96 a fifth faster than 64-key blocks in two
    # stages, whose registers spill at head dim 256); full layers within 8% (128-key splits lead
    # there); at batch 1, 5 to 11% behind 8 warps over 64-key blocks
    num_warps: int = 4
    num_stages: int = 1
    prefetch_v: bool = True
    block_n: int = 32
    split_keys: int = SPLIT_KEYS
    split_programs: int = 0  # programs per sequence and KV head over the splits (0: one per split)
    # with split_programs 0: about this many programs in a launch (a sequence's splits shared by
    # fewer programs as the batch grows: a power of two, 1 to the splits); 0: one per split
    target_programs: int = 0
    block_dk: int = 0
    # head-dim columns of V (and of the output) per program (0: the whole head dim); fewer put a
    # sequence's keys under more programs, each reading all of K for its slice of V
    block_dv: int = 0
    # pure decode steps (head dims up to 512): K and V pages read whole by the tensor memory
    # accelerator (TMA) into shared memory, this many pages in flight (`_paged_decode_tma_kernel`;
    # 0: off, the gathering kernel)
    # (`use_tma`; measured on an H100, bench/results/attention_sweep_splits_h100_e371888.json: two
    # pages in flight; at batch 96 and 768 keys, full layers (head dim 512) 150 -> 114 us at two
    # splits, 26B-A4B's sliding layers at batch 32 98 -> 78; at batch 8 and below, and over more
    # than two splits at head dim 256, the gathering kernel is as fast or up to 15% faster)
    tma_stages: int = 2
    tma_min_sequences: int = 8
    # flash-decoding splits per sequence and KV head: the power of two nearest to this many
    # programs per multiprocessor, 2 to MAX_SPLITS (`decode_splits`); 0: FIXED_SPLITS at every batch.
    # At batch 96 two splits beat sixteen by 12% (sliding layers) to 20% (full ones)
    programs_per_sm: int = 2
    # over an fp8 (e4m3) cache with 16-bit queries (any tile): the products in float16 (e4m3 -> float16 is one
    # exact conversion a pair; bfloat16 takes a second), or in the queries' dtype (False, until measured)
    fp8_products_in_fp16: bool = False
    # in a dependent launch, each program reads its rows, positions, key bounds and spans (the batch's
    # metadata, which no launch of the forward writes) before it waits for the launch before it; q
    # and the cache only after (False: the wait first, until measured)
    early_metadata: bool = False

    def __post_init__(self):
        if self.block_dk and (self.block_dk < 16 or self.block_dk & (self.block_dk - 1) or self.block_dk > 256):
            raise ValueError(f"block_dk is 0 or a power of two from 16 to 256, got {self.block_dk}")
        if self.block_dv and (self.block_dv < 16 or self.block_dv & (self.block_dv - 1)):
            raise ValueError(f"block_dv is 0 or a power of two of at least 16, got {self.block_dv}")
        if self.split_keys <= 0 or self.split_keys % 16:
            raise ValueError(f"split_keys is a positive multiple of 16, got {self.split_keys}")
        if self.tma_stages < 0 or self.tma_min_sequences < 1 or self.programs_per_sm < 0:
            raise ValueError(f"tma_stages (pages in flight, 0: off), tma_min_sequences (at least 1) and "
                             f"programs_per_sm (0: off) are counts, got {self.tma_stages}, {self.tma_min_sequences}, "
                             f"{self.programs_per_sm}")
        if self.split_programs < 0 or self.target_programs < 0:
            raise ValueError(f"split_programs and target_programs are counts (0: off), got {self.split_programs}, "
                             f"{self.target_programs}")

    def programs_per_sequence(self, splits: int, sequences: int, kv_heads: int) -> int:
        """Programs that share one sequence's (and KV head's) `splits` splits."""
        if self.split_programs:
            return min(splits, self.split_programs)
        if not self.target_programs:
            return splits
        share = max(1, self.target_programs // max(1, sequences * kv_heads))
        return min(splits, 1 << (share.bit_length() - 1))


    def use_tma(self, sequences: int, head_dim: int, splits: int) -> bool:
        """Whether a pure decode batch reads its pages by TMA: at `tma_min_sequences` or more, at
        head dims past 256 or over two splits at most (long runs of pages a program)."""
        return bool(self.tma_stages) and sequences >= self.tma_min_sequences and (head_dim > 256 or splits <= 2)


def _tiles_from_environment() -> DecodeTiles:
    """The default tiles, where TANDEM_TMA_STAGES=N (0: the gathering kernel at every batch),
    TANDEM_DECODE_PROGRAMS_PER_SM=N (0: FIXED_SPLITS at every batch) and
    TANDEM_ATTENTION_EARLY_METADATA=1 (`early_metadata`) override theirs: read once, at import, so a
    benchmark can run the earlier launches beside the new ones."""
    base = DecodeTiles()
    early = os.environ.get("TANDEM_ATTENTION_EARLY_METADATA", "1" if base.early_metadata else "0") != "0"
    return DecodeTiles(tma_stages=int(os.environ.get("TANDEM_TMA_STAGES", base.tma_stages)),
                       programs_per_sm=int(os.environ.get("TANDEM_DECODE_PROGRAMS_PER_SM", base.programs_per_sm)),
                       early_metadata=early)


DECODE_TILES = _tiles_from_environment()


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: exact products, as the twin computes them
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


# Batch-dependent integers are not specialised (Triton would compile a variant for each of "1",
# "a multiple of 16" and "other" of each), nor the alignment of the batch's metadata (views into one
# packed tensor, at offsets that follow the batch size): one compiled kernel serves every batch.
@triton.jit
def _program_rows(pid, kv_head, schedule_ptr, num_programs, query_starts_ptr, kv_lens_ptr, positions_ptr, window,
                  REP: tl.constexpr, REP_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """A program's sequence and tile rows (token, query head of `kv_head`'s group), which rows are
    real, their positions, the keys they may see [lo, hi) (window and causal bounds), and the
    sequence's length in the cache."""
    seq = tl.load(schedule_ptr + pid)
    row0 = tl.load(schedule_ptr + num_programs + pid)
    row_end = tl.load(query_starts_ptr + seq + 1)
    kv_len = tl.load(kv_lens_ptr + seq)
    offs_m = tl.arange(0, BLOCK_M)
    rows = row0 + offs_m // REP_PAD
    group_head = offs_m % REP_PAD
    row_ok = (rows < row_end) & (group_head < REP)
    heads = kv_head * REP + group_head
    pos = tl.load(positions_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    pos_min = tl.min(tl.where(row_ok, pos, _FAR), axis=0)
    pos_max = tl.max(tl.where(row_ok, pos, -1), axis=0)
    lo = tl.maximum(pos_min - window + 1, 0)
    hi = tl.minimum(kv_len, pos_max + 1)
    return seq, rows, heads, row_ok, pos, lo, hi, kv_len


@triton.jit(do_not_specialize=["num_programs", "num_rows", "stride_table"],
            do_not_specialize_on_alignment=["tables_ptr", "positions_ptr", "schedule_ptr", "query_starts_ptr",
                                            "kv_lens_ptr", "chunk_starts_ptr", "span_offsets_ptr", "span_lens_ptr",
                                            "spans_ptr"])
def _paged_attention_kernel(
    q_ptr, out_ptr, k_ptr, v_ptr, tables_ptr, positions_ptr, schedule_ptr,
    query_starts_ptr, kv_lens_ptr, chunk_starts_ptr, span_offsets_ptr, span_lens_ptr, spans_ptr,
    part_ptr, lse_ptr,
    num_programs, num_rows, num_heads, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_table,
    HEAD_DIM: tl.constexpr, REP: tl.constexpr, REP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
    PAGE: tl.constexpr, SPAN_MODE: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT_KEYS: tl.constexpr,
    SPLIT_PROGRAMS: tl.constexpr, IEEE: tl.constexpr, PREFETCH_V: tl.constexpr, PDL: tl.constexpr,
    MMA_FP16: tl.constexpr, EARLY_META: tl.constexpr,
):
    """With PDL the program waits for the launch before it first, or with EARLY_META once it has
    read the batch's metadata (its rows, positions, key bounds and spans), before q and the cache."""
    _pdl_release(PDL)
    if not EARLY_META:
        _pdl_wait(PDL)
    pid = tl.program_id(0)
    kv_head = tl.program_id(1) // NUM_DV
    dv = tl.program_id(1) % NUM_DV
    seq, rows, heads, row_ok, pos, lo, hi, kv_len = _program_rows(
        pid, kv_head, schedule_ptr, num_programs, query_starts_ptr, kv_lens_ptr, positions_ptr, window, REP, REP_PAD,
        BLOCK_M)
    if SPAN_MODE != 0:
        chunk_start = tl.load(chunk_starts_ptr + seq)
        span_base = spans_ptr + tl.load(span_offsets_ptr + seq)
        span_len = tl.load(span_lens_ptr + seq)
        q_rel = pos - chunk_start
        q_span = tl.load(span_base + q_rel, mask=row_ok & (q_rel >= 0) & (q_rel < span_len), other=0)
        if SPAN_MODE == 2:  # a span may reach below the window
            lo = tl.where(span_len > 0, tl.minimum(lo, chunk_start), lo)
        hi = tl.where(span_len > 0, kv_len, hi)  # and past the query, inside the chunk
    # splits of SPLIT_KEYS keys from the window's start (more per split only past NUM_SPLITS of
    # them): a row's partition, so its result, does not depend on its batch
    per_split = tl.maximum(SPLIT_KEYS, tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N)
    if EARLY_META:
        _pdl_wait(PDL)

    offs_dv = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh
    q_tile = q_rows  # a placeholder: with NUM_DK > 1 each head-dim chunk is loaded in the key loop
    if NUM_DK == 1:  # the whole query tile stays in registers
        offs_d = tl.arange(0, BLOCK_DK)
        q_tile = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        if MMA_FP16:
            q_tile = q_tile.to(tl.float16)
    if SPAN_MODE == 0:  # placeholders: no spans
        chunk_start = 0
        span_base = spans_ptr
        span_len = 0
        q_span = pos
    table = tables_ptr + seq.to(tl.int64) * stride_table
    if SPLIT_PROGRAMS == NUM_SPLITS:  # a program per split
        _attend_split(tl.program_id(2), lo, hi, per_split, q_tile, q_rows, rows, heads, row_ok, pos, table, kv_head, dv,
                      offs_dv, window, chunk_start, span_base, span_len, q_span, k_ptr, v_ptr, out_ptr, part_ptr,
                      lse_ptr, num_rows, num_heads, stride_ot, stride_oh, stride_kp, stride_ks, stride_kh, stride_vp,
                      stride_vs, stride_vh, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, BLOCK_DV, PAGE, SPAN_MODE,
                      NUM_SPLITS, IEEE, PREFETCH_V, MMA_FP16)
    else:  # each program takes every SPLIT_PROGRAMS-th split: the same partition, fewer programs
        for split in range(tl.program_id(2), NUM_SPLITS, SPLIT_PROGRAMS):
            _attend_split(split, lo, hi, per_split, q_tile, q_rows, rows, heads, row_ok, pos, table, kv_head, dv,
                          offs_dv, window, chunk_start, span_base, span_len, q_span, k_ptr, v_ptr, out_ptr, part_ptr,
                          lse_ptr, num_rows, num_heads, stride_ot, stride_oh, stride_kp, stride_ks, stride_kh,
                          stride_vp, stride_vs, stride_vh, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, BLOCK_DV, PAGE,
                          SPAN_MODE, NUM_SPLITS, IEEE, PREFETCH_V, MMA_FP16)


@triton.jit
def _attend_split(split, lo, hi, per_split, q_tile, q_rows, rows, heads, row_ok, pos, table, kv_head, dv, offs_dv,
                  window, chunk_start, span_base, span_len, q_span, k_ptr, v_ptr, out_ptr, part_ptr, lse_ptr,
                  num_rows, num_heads, stride_ot, stride_oh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs,
                  stride_vh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PAGE: tl.constexpr,
                  SPAN_MODE: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, PREFETCH_V: tl.constexpr,
                  MMA_FP16: tl.constexpr):
    """One split's keys [lo + split * per_split, ...) folded into an online softmax: the output
    (one split) or the split's partial result and log2-sum-exp2. With MMA_FP16 (an fp8 cache) the
    products take float16 operands: e4m3 converts to float16 in one instruction a pair and exactly,
    where bfloat16 needs a second conversion."""
    mma_ty: tl.constexpr = tl.float16 if MMA_FP16 else out_ptr.dtype.element_ty
    split_lo = lo + split * per_split
    split_hi = tl.minimum(hi, split_lo + per_split)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked row stays NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start in range(split_lo, split_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < split_hi
        page = tl.load(table + keys // PAGE, mask=key_ok, other=-1).to(tl.int64)
        key_ok = key_ok & (page >= 0)
        k_slots = k_ptr + page * stride_kp + (keys % PAGE).to(tl.int64) * stride_ks + kv_head * stride_kh
        v_slots = v_ptr + page * stride_vp + (keys % PAGE).to(tl.int64) * stride_vs + kv_head * stride_vh
        v_ok = key_ok[:, None] & (offs_dv < HEAD_DIM)[None, :]
        if PREFETCH_V:  # V's loads issued with K's, before the scores need K
            v_tile = tl.load(v_slots[:, None] + offs_dv[None, :], mask=v_ok, other=0.0).to(mma_ty)
        scores = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(NUM_DK):
            offs_d = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
            d_ok = offs_d < HEAD_DIM
            if NUM_DK == 1:
                q_chunk = q_tile
            else:
                q_chunk = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            k_tile = tl.load(k_slots[:, None] + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            scores += _dot(q_chunk.to(mma_ty), tl.trans(k_tile.to(mma_ty)), IEEE)

        diff = pos[:, None] - keys[None, :]
        in_window = diff < window
        allowed = (diff >= 0) & in_window
        if SPAN_MODE != 0:
            k_rel = keys - chunk_start
            k_span = tl.load(span_base + k_rel, mask=key_ok & (k_rel >= 0) & (k_rel < span_len), other=0)
            same = (q_span[:, None] == k_span[None, :]) & (q_span[:, None] > 0)
            if SPAN_MODE == 1:
                same = same & in_window
            allowed = allowed | same
        allowed = allowed & key_ok[None, :] & row_ok[:, None]
        scores = tl.where(allowed, scores * _LOG2E, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if not PREFETCH_V:
            v_tile = tl.load(v_slots[:, None] + offs_dv[None, :], mask=v_ok, other=0.0).to(mma_ty)
        acc = acc * alpha[:, None] + _dot(p.to(v_tile.dtype), v_tile, IEEE)
        m_i = m_new

    out_ok = row_ok[:, None] & (offs_dv < HEAD_DIM)[None, :]
    norm = tl.where(l_i > 0, l_i, 1.0)
    if NUM_SPLITS == 1:
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_dv[None, :]
        tl.store(out, (acc / norm[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)
    else:  # partial result and its log2-sum-exp2, merged by _merge_splits_kernel
        cell = (split * num_rows + rows.to(tl.int64)) * num_heads + heads
        # a row that saw no key here (a split past its keys) stores its -inf only: the merge skips it
        tl.store(part_ptr + cell[:, None] * HEAD_DIM + offs_dv[None, :], acc / norm[:, None],
                 mask=out_ok & (l_i > 0)[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(norm), float("-inf"))
        if dv == 0:
            tl.store(lse_ptr + cell, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_programs", "num_rows", "stride_table"],
            do_not_specialize_on_alignment=["tables_ptr", "positions_ptr", "schedule_ptr", "query_starts_ptr",
                                            "kv_lens_ptr"])
def _paged_decode_tma_kernel(
    q_ptr, out_ptr, k_desc, v_desc, tables_ptr, positions_ptr, schedule_ptr, query_starts_ptr, kv_lens_ptr,
    part_ptr, lse_ptr, num_programs, num_rows, num_heads, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
    HEAD_DIM: tl.constexpr, BOX_D: tl.constexpr, REP: tl.constexpr, REP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT_KEYS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    MMA_FP16: tl.constexpr, EARLY_META: tl.constexpr,
):
    """Decode rows (one query token a sequence) of one KV head over one split of their keys, a
    page at a time: each page's K and V rows of this head are [PAGE, BOX_D] boxes of the cache
    viewed as [pages * PAGE, kv_heads * HEAD_DIM] (one box, or two at head dim 512 as a box is at
    most 256 wide), loaded by TMA (a released page, -1, lies outside the view and reads as zeros).
    Splits start at page boundaries; keys outside the split, the window or the sequence are
    masked, and V's rows there are zeroed (a reused page may hold anything past the sequence).
    Same outputs as `_attend_split`: the result, or per split the partial result and its
    log2-sum-exp2 for `_merge_splits_kernel`. With EARLY_META the dependent wait comes after the
    metadata reads, as in `_paged_attention_kernel`."""
    _pdl_release(PDL)
    if not EARLY_META:
        _pdl_wait(PDL)
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    mma_ty: tl.constexpr = tl.float16 if MMA_FP16 else out_ptr.dtype.element_ty
    TWO: tl.constexpr = HEAD_DIM > BOX_D  # the head dim in two boxes
    seq, rows, heads, row_ok, pos, lo, hi, kv_len = _program_rows(
        pid, kv_head, schedule_ptr, num_programs, query_starts_ptr, kv_lens_ptr, positions_ptr, window, REP, REP_PAD,
        BLOCK_M)
    first = lo - lo % PAGE  # splits of whole pages from the page holding the window's first key
    per_split = tl.maximum(SPLIT_KEYS, tl.cdiv(tl.cdiv(tl.maximum(hi - first, 0), NUM_SPLITS), PAGE) * PAGE)
    split_lo = first + split * per_split
    split_hi = tl.minimum(hi, split_lo + per_split)
    if EARLY_META:
        _pdl_wait(PDL)
    offs_d = tl.arange(0, BOX_D)
    q_base = q_ptr + rows.to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q0 = tl.load(q_base, mask=row_ok[:, None], other=0.0).to(mma_ty)
    acc0 = tl.zeros([BLOCK_M, BOX_D], dtype=tl.float32)
    if TWO:
        q1 = tl.load(q_base + BOX_D, mask=row_ok[:, None], other=0.0).to(mma_ty)
        acc1 = tl.zeros([BLOCK_M, BOX_D], dtype=tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_table
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    col = kv_head * HEAD_DIM
    for start in range(split_lo, split_hi, PAGE):
        page = tl.load(table + start // PAGE).to(tl.int32)
        keys = start + tl.arange(0, PAGE)
        key_ok = (keys >= lo) & (keys < split_hi) & (page >= 0)
        scores = _dot(q0, tl.trans(k_desc.load([page * PAGE, col]).to(mma_ty)), IEEE)
        if TWO:
            scores += _dot(q1, tl.trans(k_desc.load([page * PAGE, col + BOX_D]).to(mma_ty)), IEEE)
        diff = pos[:, None] - keys[None, :]
        allowed = (diff >= 0) & (diff < window) & key_ok[None, :] & row_ok[:, None]
        scores = tl.where(allowed, scores * _LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(mma_ty)
        v0 = tl.where(key_ok[:, None], v_desc.load([page * PAGE, col]).to(mma_ty), 0.0)
        acc0 = acc0 * alpha[:, None] + _dot(p, v0, IEEE)
        if TWO:
            v1 = tl.where(key_ok[:, None], v_desc.load([page * PAGE, col + BOX_D]).to(mma_ty), 0.0)
            acc1 = acc1 * alpha[:, None] + _dot(p, v1, IEEE)
        m_i = m_new
    norm = tl.where(l_i > 0, l_i, 1.0)
    cell = (split * num_rows + rows.to(tl.int64)) * num_heads + heads
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh
    _tma_store(acc0, norm, l_i, offs_d, out_rows, part_ptr, cell, row_ok, HEAD_DIM, NUM_SPLITS)
    if TWO:
        _tma_store(acc1, norm, l_i, offs_d + BOX_D, out_rows, part_ptr, cell, row_ok, HEAD_DIM, NUM_SPLITS)
    if NUM_SPLITS > 1:
        tl.store(lse_ptr + cell, tl.where(l_i > 0, m_i + tl.log2(norm), float("-inf")), mask=row_ok)


@triton.jit
def _tma_store(acc, norm, l_i, offs_d, out_rows, part_ptr, cell, row_ok, HEAD_DIM: tl.constexpr,
               NUM_SPLITS: tl.constexpr):
    """Head-dim columns `offs_d` of the rows' result: the output (one split), or the split's
    partial result where the split saw keys."""
    if NUM_SPLITS == 1:
        tl.store(out_rows + offs_d[None, :], (acc / norm[:, None]).to(out_rows.dtype.element_ty),
                 mask=row_ok[:, None])
    else:
        tl.store(part_ptr + cell[:, None] * HEAD_DIM + offs_d[None, :], acc / norm[:, None],
                 mask=row_ok[:, None] & (l_i > 0)[:, None])


@triton.jit(do_not_specialize=["num_rows"])
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, num_rows, num_heads, stride_ot, stride_oh, HEAD_DIM: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    _pdl_release(PDL)
    _pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    cell = (splits * num_rows + row) * num_heads + head
    lse = tl.load(lse_ptr + cell, mask=split_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # every row has its own key in some split
    offs_d = tl.arange(0, BLOCK_D)
    seen = split_ok & (lse > float("-inf"))  # splits that stored a partial result (others wrote none)
    part = tl.load(part_ptr + cell[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=seen[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_num_splits(batch: ForwardBatch, kv_heads: int, block_m: int, device: torch.device,
                       tiles: DecodeTiles, window: int = NO_WINDOW) -> int:
    """Flash-decoding splits: for decode-like tiles on a GPU `decode_splits` of the batch's
    sequences (a captured graph's are its padded batch), at most the power of two that covers a
    sliding `window` in SPLIT_BLOCK-key splits (at least 2); 1 otherwise."""
    if block_m > 16 or device.type != "cuda":
        return 1
    splits = decode_splits(batch.num_seqs, kv_heads, tiles.programs_per_sm, _multiprocessors(device))
    return min(splits, max(2, _pow2(-(-window // SPLIT_BLOCK))))


def decode_splits(sequences: int, kv_heads: int, programs_per_sm: int, multiprocessors: int) -> int:
    """The splits of each sequence's keys: the power of two nearest (by ratio) to the count that
    gives `programs_per_sm` programs per multiprocessor (sequences x KV heads x splits), from 2
    to `MAX_SPLITS`; with `programs_per_sm` 0, FIXED_SPLITS whatever the batch. A row's partition,
    so its result, depends on its batch only through that count (rows of batches with the same
    count agree bit for bit), and the kernels compile one variant per count. Splits past a
    sequence's keys exit at once."""
    if not programs_per_sm:
        return FIXED_SPLITS
    want = programs_per_sm * multiprocessors / max(1, sequences * kv_heads)
    splits = 2
    while splits < MAX_SPLITS and splits * 1.4142135 < want:  # past the geometric midpoint to the next
        splits *= 2
    return splits


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_attention_triton(
    q: torch.Tensor,
    group: KVGroup,
    slot: int,
    batch: ForwardBatch,
    layer_type: str,
    span_mode: str = "none",
    num_splits: int | None = None,
    tiles: DecodeTiles | None = None,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> output [T, heads, head_dim] in q's dtype; softmax scale 1.

    Same contract as `attention.paged_attention`. `num_splits` (keys of each sequence split over
    that many programs, then merged) defaults to `default_num_splits`, a choice by batch size.
    `tiles` overrides the decode-like tiles' launch (`DECODE_TILES`; for `bench/attention_sweep.py`).
    """
    if not q.is_cuda and not _interpreting():
        raise ValueError("paged_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if span_mode not in SPAN_MODES:
        raise ValueError(f"unknown span mode {span_mode!r}")
    T, heads, head_dim = q.shape
    k, v = group.k[slot], group.v[slot]  # [pages, page_size, kv_heads, head_dim]
    kv_heads = k.shape[2]
    assert heads % kv_heads == 0 and k.shape[3] == head_dim and k.stride(3) == 1 and v.stride(3) == 1
    page = batch.page_size
    assert page & (page - 1) == 0, "page sizes are powers of two"
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    layout = batch.layout
    rep = heads // kv_heads
    rep_pad = _pow2(rep)
    d_pad = max(16, _pow2(head_dim))
    # Decode-like batches take 16-row tiles; prefill chunks 64 rows (32 for a 512 head dim).
    block_m = max(16, _pow2(rep_pad * layout.max_query_len))
    if block_m > 16:
        block_m = max(rep_pad, 32 if d_pad > 256 else 64)
    block_n = 64 if block_m <= 16 and d_pad <= 256 else 32  # by head dim, where the tiles leave it 0
    decode = tiles or DECODE_TILES
    num_warps, num_stages, prefetch_v = (decode.num_warps, decode.num_stages, decode.prefetch_v) if block_m <= 16 \
        else (8, 2, False)
    if block_m <= 16 and decode.block_n:
        block_n = decode.block_n
    block_dk = min(d_pad, decode.block_dk or 256) if block_m <= 16 else min(d_pad, 256)
    if q.element_size() > 2:  # float32 (tests, the CPU): halve the tiles' bytes
        block_n, block_dk = 32, min(block_dk, 128)
    block_dv = min(d_pad, decode.block_dv or d_pad) if block_m <= 16 else min(d_pad, 256)
    splits = num_splits if num_splits is not None else default_num_splits(batch, kv_heads, block_m, q.device, decode,
                                                                            window_of(group))
    schedule = layout.schedule(block_m // rep_pad)
    if (decode.use_tma(batch.num_seqs, head_dim, splits) and block_m <= 16 and layout.max_query_len == 1
            and head_dim == d_pad <= 512 and page >= 16 and k.is_contiguous() and v.is_contiguous()
            and tma_capable(q)):
        _launch_tma(q, out, k, v, batch, layer_type, schedule, splits, rep, rep_pad, block_m, window_of(group),
                    decode, decode.split_keys)
        return out
    programs = schedule.shape[1]
    window = window_of(group)
    part, lse = _split_buffers(q, out, splits)
    tables = batch.groups[layer_type].page_tables
    split_programs = decode.programs_per_sequence(splits, programs, kv_heads) if block_m <= 16 else splits
    grid = (programs, kv_heads * (d_pad // block_dv), split_programs)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _launch(grid, q, out, k, v, tables, batch, schedule, part, lse, programs, window, splits,
                dict(HEAD_DIM=head_dim, REP=rep, REP_PAD=rep_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=block_dk,
                     NUM_DK=d_pad // block_dk, BLOCK_DV=block_dv, NUM_DV=d_pad // block_dv, PAGE=page,
                     SPAN_MODE=SPAN_MODES[span_mode], NUM_SPLITS=splits,
                     SPLIT_KEYS=decode.split_keys if block_m <= 16 else SPLIT_KEYS, SPLIT_PROGRAMS=split_programs,
                     IEEE=q.dtype == torch.float32, PREFETCH_V=prefetch_v, PDL=pdl(q), launch_pdl=pdl(q),
                     MMA_FP16=k.element_size() == 1 and q.element_size() == 2 and decode.fp8_products_in_fp16,
                     EARLY_META=decode.early_metadata and block_m <= 16, num_warps=num_warps, num_stages=num_stages))
    return out


def window_of(group: KVGroup) -> int:
    return NO_WINDOW if group.window is None else group.window


def _split_buffers(q: torch.Tensor, out: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial results [splits, T, heads, head_dim] and log2-sum-exp2s [splits, T, heads] of
    flash-decoding splits (float32); with one split, `out` stands in for both (unused)."""
    if splits == 1:
        return out, out
    T, heads, head_dim = q.shape
    return (torch.empty((splits, T, heads, head_dim), dtype=torch.float32, device=q.device),
            torch.empty((splits, T, heads), dtype=torch.float32, device=q.device))


def _merge_splits(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, splits: int) -> None:
    """`_merge_splits_kernel` into `out` [T, heads, head_dim] where there are splits to merge."""
    if splits == 1:
        return
    T, heads, head_dim = out.shape
    _merge_splits_kernel[(T, heads)](
        part, lse, out, T, heads, out.stride(0), out.stride(1), HEAD_DIM=head_dim, NUM_SPLITS=splits,
        SPLITS_PAD=max(2, _pow2(splits)), BLOCK_D=max(16, _pow2(head_dim)), PDL=pdl(out), launch_pdl=pdl(out))


def _launch_tma(q, out, k, v, batch, layer_type, schedule, splits, rep, rep_pad, block_m, window, tiles,
                split_keys) -> None:
    """`_paged_decode_tma_kernel` over a pure decode batch, then the merge of its splits."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    T, heads, head_dim = q.shape
    pages, page, kv_heads, _ = k.shape
    box = min(head_dim, 256)  # a TMA box is at most 256 elements wide
    descs = [TensorDescriptor(c.view(pages * page, kv_heads * head_dim), [pages * page, kv_heads * head_dim],
                              [kv_heads * head_dim, 1], [page, box]) for c in (k, v)]
    part, lse = _split_buffers(q, out, splits)
    tables, layout, programs = batch.groups[layer_type].page_tables, batch.layout, schedule.shape[1]
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _paged_decode_tma_kernel[(programs, kv_heads, splits)](
            q, out, *descs, tables, batch.positions, schedule, layout.query_starts, layout.kv_lens, part, lse,
            programs, T, heads, window, q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
            HEAD_DIM=head_dim, BOX_D=box, REP=rep, REP_PAD=rep_pad, BLOCK_M=block_m, PAGE=page,
            NUM_SPLITS=splits, SPLIT_KEYS=split_keys, IEEE=q.dtype == torch.float32, PDL=pdl(q),
            MMA_FP16=k.element_size() == 1 and q.element_size() == 2 and tiles.fp8_products_in_fp16,
            EARLY_META=tiles.early_metadata, launch_pdl=pdl(q), num_warps=tiles.num_warps, num_stages=tiles.tma_stages)
        _merge_splits(part, lse, out, splits)


def _launch(grid, q, out, k, v, tables, batch, schedule, part, lse, programs, window, splits, meta) -> None:
    layout = batch.layout
    T, heads, head_dim = q.shape
    _paged_attention_kernel[grid](
        q, out, k, v, tables, batch.positions, schedule,
        layout.query_starts, layout.kv_lens, layout.chunk_starts, layout.span_offsets, layout.span_lens,
        layout.spans, part, lse,
        programs, T, heads, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), tables.stride(0), **meta,
    )
    _merge_splits(part, lse, out, splits)
