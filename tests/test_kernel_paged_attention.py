"""`paged_attention_triton` against its twin `attention.paged_attention` (in Triton's interpreter
on CPU, in bf16 at real Gemma 4 shapes in the `gpu` tests), and the decoder with kernels on."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import pytest
import torch

from gemma4_model.attention import paged_attention
from gemma4_model.batch import ForwardBatch, GroupView
from gemma4_model.kernels import paged_attention as attention_kernels
from gemma4_model.kernels.paged_attention import (
    DECODE_TILES, FIXED_SPLITS, MAX_SPLITS, DecodeTiles, decode_splits, default_num_splits, paged_attention_triton)
from gemma4_model.kv_cache import NO_PAGE, KVGroup
from gemma4_model.page_pool import PagePool

LAYER = "sliding_attention"


@dataclass(frozen=True)
class Seq:
    """A sequence with `cached` positions already in the cache and `queries` new ones this step."""

    cached: int
    queries: int
    spans: tuple[int, ...] | None = None  # span id per query position (the chunk)


def make_case(seqs, *, heads, kv_heads, head_dim, page, window=None, dtype=torch.float32, device="cpu", seed=0,
              q_scale=1.0):
    """A KV group with random K/V on scattered pages, and the batch of `seqs` over it. Pages wholly
    below a sliding window are NO_PAGE, as the cache releases them."""
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)  # large caches are drawn where they live
    pages_per_seq = [-(-(s.cached + s.queries) // page) for s in seqs]
    num_pages = sum(pages_per_seq) + 3
    shape = (1, num_pages, page, kv_heads, head_dim)
    k = torch.randn(shape, generator=gd, device=device).to(dtype)
    v = torch.randn(shape, generator=gd, device=device).to(dtype)
    group = KVGroup(LAYER, (0,), window, PagePool(num_pages), k, v)
    order = torch.randperm(num_pages, generator=g).tolist()
    tables = torch.full((len(seqs), max(pages_per_seq)), NO_PAGE, dtype=torch.long)
    positions, starts = [], [0]
    for b, (s, n) in enumerate(zip(seqs, pages_per_seq)):
        first = 0 if window is None else max(0, s.cached - window + 1) // page
        tables[b, first:n] = torch.tensor(order[:n][first:])
        order = order[n:]
        positions.extend(range(s.cached, s.cached + s.queries))
        starts.append(starts[-1] + s.queries)
    T = starts[-1]
    batch = ForwardBatch(
        token_ids=torch.zeros(T, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        query_starts=tuple(starts),
        kv_lens=tuple(s.cached + s.queries for s in seqs),
        chunk_starts=tuple(s.cached for s in seqs),
        chunk_spans=tuple(None if s.spans is None else torch.tensor(s.spans, device=device) for s in seqs),
        groups={LAYER: GroupView(tables.to(device), torch.zeros(T, dtype=torch.long, device=device))},
        logits_rows=torch.zeros(1, dtype=torch.long, device=device),
        page_size=page,
    )
    q = torch.randn((T, heads, head_dim), generator=gd, device=device) * q_scale
    return q.to(dtype), group, batch


def twin_fp32(q, group, batch, span_mode):
    """The twin in float32 over the same (possibly bf16) inputs."""
    group32 = KVGroup(group.layer_type, group.layers, group.window, group.pool, group.k.float(), group.v.float())
    return paged_attention(q.float(), group32, 0, batch, LAYER, span_mode)


def check(seqs, span_mode="none", atol=2e-5, **kw):
    q, group, batch = make_case(seqs, **kw)
    want = paged_attention(q, group, 0, batch, LAYER, span_mode)
    got = paged_attention_triton(q, group, 0, batch, LAYER, span_mode)
    assert got.dtype == q.dtype and got.shape == q.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
    return q, group, batch, got


# --- CPU, in Triton's interpreter ----------------------------------------------------------------

SPANS = (0, 0, 1, 1, 1, 1, 1, 0, 2, 2, 2, 0)  # two images in a 12-token chunk


@pytest.mark.parametrize("page", [16, 4])
def test_decode_batch_with_gqa(page):
    check([Seq(37, 1), Seq(5, 1), Seq(80, 1)], heads=4, kv_heads=2, head_dim=32, page=page)


def test_mixed_batch_prefill_chunk_verify_and_decode_with_prefix_in_cache():
    check([Seq(21, 40), Seq(9, 1), Seq(30, 5), Seq(0, 19)], heads=2, kv_heads=1, head_dim=32, page=16)


@pytest.mark.parametrize("page", [16, 4])
def test_sliding_window_shorter_than_the_context_skips_released_pages(page):
    q, group, batch, _ = check([Seq(50, 20), Seq(70, 1), Seq(3, 2)], heads=4, kv_heads=1, head_dim=16,
                               page=page, window=12)
    assert (batch.groups[LAYER].page_tables == NO_PAGE).any()  # the kernel never reads released pages


LONG_SPANS = (0,) * 5 + (3,) * 70 + (0,) * 5  # one image over two 64-row query blocks


@pytest.mark.parametrize("span_mode", ["windowed", "override"])
def test_spans_see_each_other(span_mode):
    seqs = [Seq(10, 12, SPANS), Seq(40, 1), Seq(4, 12, SPANS[::-1]), Seq(6, 80, LONG_SPANS)]
    q, group, batch, got = check(seqs, span_mode=span_mode, heads=2, kv_heads=2, head_dim=16, page=4, window=4)
    plain = paged_attention(q, group, 0, batch, LAYER, "none")
    assert not torch.allclose(got[:12], plain[:12])  # the spans changed what the image tokens see


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(256, 2, 1), (512, 2, 2)])
def test_gemma_head_dims(head_dim, heads, kv_heads):
    check([Seq(20, 1), Seq(6, 18)], heads=heads, kv_heads=kv_heads, head_dim=head_dim, page=16, window=16)


def test_flash_decoding_splits_equal_one_pass():
    """1100 keys over 16 splits, 3 keys over one (the rest empty); a window: fewer splits."""
    q, group, batch = make_case([Seq(1100, 1), Seq(3, 1), Seq(150, 1)], heads=2, kv_heads=1, head_dim=16, page=16)
    want = paged_attention(q, group, 0, batch, LAYER, "none")
    for splits in (1, 16):
        got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=splits)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    q, group, batch = make_case([Seq(150, 1), Seq(64, 1)], heads=4, kv_heads=2, head_dim=32, page=16, window=100)
    torch.testing.assert_close(paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=16),
                               paged_attention(q, group, 0, batch, LAYER, "none"), atol=2e-5, rtol=1e-4)


def test_decode_tile_launches_give_the_default_result():
    """V loaded with K, other warps, stages and key blocks (bench/attention_sweep.py's variants), the
    metadata read ahead of the dependent wait: the same keys in the same order, so the same output;
    fewer programs over the same splits too."""
    q, group, batch = make_case([Seq(620, 1), Seq(3, 1), Seq(150, 1)], heads=4, kv_heads=2, head_dim=32, page=16,
                                window=400)
    want = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=16)
    torch.testing.assert_close(want, paged_attention(q, group, 0, batch, LAYER, "none"), atol=2e-5, rtol=1e-4)
    for tiles in (DecodeTiles(prefetch_v=True), DecodeTiles(8, 3, True, 16), DecodeTiles(4, 1, False, 32),
                  DecodeTiles(early_metadata=True)):
        torch.testing.assert_close(paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=16,
                                                          tiles=tiles), want, atol=1e-6, rtol=1e-6)
    # fewer programs, each taking every so-many-th split: the same partition, the same bits
    for programs in (1, 3, 4):
        got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=16,
                                     tiles=DecodeTiles(split_programs=programs))
        assert torch.equal(got, want)
    for target in (1, 24, 50):  # 1, 4 and 8 programs a sequence (3 sequences, 2 KV heads)
        got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=16,
                                     tiles=DecodeTiles(target_programs=target))
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="split_programs"):
        DecodeTiles(split_programs=-1)
    tiles = DecodeTiles(target_programs=512)
    assert [tiles.programs_per_sequence(16, n, 8) for n in (1, 4, 8, 64, 100)] == [16, 16, 8, 1, 1]
    assert DecodeTiles().programs_per_sequence(16, 64, 8) == 16
    assert DecodeTiles(split_programs=4, target_programs=512).programs_per_sequence(16, 1, 2) == 4
    # longer splits partition the keys otherwise: the same result up to summation order
    # as do scores summed over head-dim chunks of K
    for tiles in (DecodeTiles(split_keys=256), DecodeTiles(split_keys=16), DecodeTiles(8, 2, True, 32, 512),
                  DecodeTiles(block_dk=16)):
        torch.testing.assert_close(paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=16,
                                                          tiles=tiles), want, atol=2e-5, rtol=1e-4)
    # short splits, MAX_SPLITS of them (a batch of one over many programs)
    torch.testing.assert_close(paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=MAX_SPLITS,
                                                      tiles=DecodeTiles(split_keys=16)), want, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of 16"):
        DecodeTiles(split_keys=40)
    for block_dk in (8, 48, 512):
        with pytest.raises(ValueError, match="block_dk"):
            DecodeTiles(block_dk=block_dk)


@pytest.mark.parametrize("heads, kv_heads, window, splits", [(4, 2, 200, 16), (8, 2, None, 1), (2, 2, 40, 16)])
def test_tma_decode_pages_against_the_twin(heads, kv_heads, window, splits):
    """`DecodeTiles(tma_stages=3)`: pure decode rows read a page at a time through tensor descriptors
    (released pages below the window read as zeros and are masked): the twin's result."""
    seqs = [Seq(300, 1), Seq(3, 1), Seq(150, 1), Seq(16, 1), Seq(47, 1)]
    q, group, batch = make_case(seqs, heads=heads, kv_heads=kv_heads, head_dim=32, page=16, window=window)
    want = paged_attention(q, group, 0, batch, LAYER, "none")
    got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=splits, tiles=DecodeTiles(tma_stages=3))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    early = DecodeTiles(tma_stages=3, early_metadata=True)  # the metadata read ahead of the dependent wait
    assert torch.equal(paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=splits, tiles=early), got)
    # a reused page may hold anything past a sequence's keys: no trace of it in the result
    group.v[0][batch.groups[LAYER].page_tables[1, 0]] = float("inf")  # holds positions 0..3 of a 4-key sequence
    group.v[0][batch.groups[LAYER].page_tables[1, 0], 4:] = float("nan")
    group.v[0][batch.groups[LAYER].page_tables[1, 0], :4] = want.new_zeros(()).float()
    assert paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=splits,
                                  tiles=DecodeTiles(tma_stages=3)).isfinite().all()


def test_tma_decode_splits_take_whole_pages():
    """Splits asked shorter than a page (split_keys 16 over 32-key pages, more splits than pages):
    the TMA kernel's splits are whole pages, and the result is the twin's."""
    q, group, batch = make_case([Seq(200, 1), Seq(33, 1)], heads=4, kv_heads=2, head_dim=32, page=32, window=150)
    want = paged_attention(q, group, 0, batch, LAYER, "none")
    got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=32,
                                 tiles=DecodeTiles(tma_stages=2, split_keys=16))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_tma_decode_only_where_the_device_has_tma(monkeypatch):
    """Tiles that ask for TMA pages on a device without TMA (`fused.tma_capable`, before Hopper)
    take the gathering kernel: the same result, no tensor descriptors."""
    q, group, batch = make_case([Seq(90, 1), Seq(20, 1)], heads=4, kv_heads=2, head_dim=32, page=16)
    want = paged_attention(q, group, 0, batch, LAYER, "none")
    monkeypatch.setattr(attention_kernels, "tma_capable", lambda t: False)
    monkeypatch.setattr(attention_kernels, "_launch_tma", lambda *a, **k: pytest.fail("a TMA launch"))
    got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=2,
                                 tiles=DecodeTiles(tma_stages=2, tma_min_sequences=1))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_tma_decode_at_head_dim_512_reads_two_boxes_a_page():
    """Full layers' head dim (512) is two 256-wide TMA boxes of K and of V a page."""
    q, group, batch = make_case([Seq(40, 1), Seq(17, 1)], heads=4, kv_heads=2, head_dim=512, page=16)
    want = paged_attention(q, group, 0, batch, LAYER, "none")
    for splits in (1, 4):
        got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=splits,
                                     tiles=DecodeTiles(tma_stages=3))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_decode_tiles_from_the_environment():
    import subprocess
    import sys

    script = ("from gemma4_model.kernels.paged_attention import DECODE_TILES as t; "
              "print(t.tma_stages, t.programs_per_sm, t.early_metadata)")
    names = ("TANDEM_TMA_STAGES", "TANDEM_DECODE_PROGRAMS_PER_SM", "TANDEM_ATTENTION_EARLY_METADATA")
    base = DecodeTiles()
    for env, want in (({names[0]: "3", names[1]: "0", names[2]: "1"}, "3 0 True"),
                      ({}, f"{base.tma_stages} {base.programs_per_sm} {base.early_metadata}")):
        environ = {k: v for k, v in os.environ.items() if k not in names} | env
        done = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == want


def test_decode_splits_by_batch_and_when_tma_reads_the_pages(monkeypatch):
    sms, per_sm = 132, 2
    assert decode_splits(1, 2, 0, sms) == decode_splits(500, 8, 0, sms) == FIXED_SPLITS  # off: every batch alike
    assert decode_splits(1, 2, per_sm, sms) == MAX_SPLITS == 32  # one sequence: all the splits
    assert decode_splits(4, 2, per_sm, sms) == 32 and decode_splits(8, 2, per_sm, sms) == 16
    assert decode_splits(96, 8, per_sm, sms) == decode_splits(96, 2, per_sm, sms) == 2  # 26B-A4B at batch 96
    assert decode_splits(32, 2, per_sm, sms) == 4  # 64 programs a split: 4.1 per multiprocessor wanted
    for kv_heads in (1, 2, 8):
        last = MAX_SPLITS
        for sequences in range(1, 300):
            splits = decode_splits(sequences, kv_heads, per_sm, sms)
            assert splits in (2, 4, 8, 16, 32) and splits <= last  # one compiled variant per count
            want = per_sm * sms / (sequences * kv_heads)
            assert splits in (2, MAX_SPLITS) or 2**-0.5 <= want / splits <= 2**0.5  # the nearest by ratio
            last = splits
    # on a GPU, no more splits than a sliding window holds 32-key blocks: E4B's 512-key window 16 at batch 1
    cuda = torch.device("cuda")
    monkeypatch.setattr(attention_kernels, "_multiprocessors", lambda device: sms)
    one = ForwardBatch(token_ids=torch.zeros(1, dtype=torch.long), positions=torch.zeros(1, dtype=torch.long),
                       query_starts=(0, 1), kv_lens=(1,), chunk_starts=(0,), chunk_spans=(None,), groups={},
                       logits_rows=torch.zeros(1, dtype=torch.long), page_size=16)
    assert [default_num_splits(one, 2, 16, cuda, DECODE_TILES, w) for w in (512, 1024, 100, 1, 1 << 30)] == [
        16, 32, 4, 2, 32]
    assert default_num_splits(one, 2, 64, cuda, DECODE_TILES, 512) == 1  # prefill tiles: no splits
    assert default_num_splits(one, 2, 16, torch.device("cpu"), DECODE_TILES, 512) == 1
    tiles = DecodeTiles(tma_stages=2, tma_min_sequences=8)
    assert tiles.use_tma(8, 512, 16) and tiles.use_tma(8, 256, 2)
    assert not tiles.use_tma(7, 512, 2) and not tiles.use_tma(8, 256, 4) and not DecodeTiles(tma_stages=0).use_tma(
        100, 512, 2)
    for bad in (dict(tma_min_sequences=0), dict(programs_per_sm=-1), dict(tma_stages=-1)):
        with pytest.raises(ValueError, match="counts"):
            DecodeTiles(**bad)


def test_tma_decode_over_fp8_pages_with_float16_products():
    q, group, batch = make_case([Seq(300, 1), Seq(40, 1), Seq(5, 1)], heads=8, kv_heads=2, head_dim=256, page=16,
                                window=128, dtype=torch.bfloat16, q_scale=256**-0.5)
    fp8 = torch.float8_e4m3fn
    group = KVGroup(group.layer_type, group.layers, group.window, group.pool, group.k.to(fp8), group.v.to(fp8))
    got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=16,
                                 tiles=DecodeTiles(tma_stages=3, fp8_products_in_fp16=True))
    torch.testing.assert_close(got.float(), twin_fp32(q, group, batch, "none"), atol=1e-2, rtol=2e-2)


def test_v_head_dim_over_programs_gives_the_default_result():
    """`DecodeTiles.block_dv`: V's head dim over two programs, each with all of K: each column
    summed alike."""
    q, group, batch = make_case([Seq(150, 1), Seq(3, 1)], heads=4, kv_heads=2, head_dim=32, page=16, window=100)
    want = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=4)
    got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=4, tiles=DecodeTiles(block_dv=16))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for block_dv in (8, 24):
        with pytest.raises(ValueError, match="block_dv"):
            DecodeTiles(block_dv=block_dv)


def test_splits_past_a_rows_keys_store_nothing_the_merge_reads(monkeypatch):
    """A split that saw none of a row's keys writes only its -inf log-sum-exp: buffers that
    start as NaN (fresh device memory may hold anything) leave the merged result finite."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    q, group, batch = make_case([Seq(3, 1), Seq(200, 1)], heads=2, kv_heads=1, head_dim=16, page=16)
    want = paged_attention(q, group, 0, batch, LAYER, "none")
    monkeypatch.setattr(torch, "empty", nan_empty)
    got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=16)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_a_decode_row_does_not_depend_on_its_batch():
    """The same sequence decoded alone and beside others: bit-identical (its splits are its own),
    so a captured graph's padded batch and an eager step agree, as do topologies that batch
    requests differently."""
    alone_q, alone_group, alone = make_case([Seq(1100, 1)], heads=2, kv_heads=1, head_dim=16, page=16)
    q, group, batch = make_case([Seq(1100, 1), Seq(300, 1), Seq(7, 1)], heads=2, kv_heads=1, head_dim=16, page=16)
    mine = alone.groups[LAYER].page_tables[0]
    group.k[0, batch.groups[LAYER].page_tables[0, :mine.numel()]] = alone_group.k[0, mine]  # its KV, its query
    group.v[0, batch.groups[LAYER].page_tables[0, :mine.numel()]] = alone_group.v[0, mine]
    q[:1] = alone_q
    got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=16)
    assert torch.equal(got[:1], paged_attention_triton(alone_q, alone_group, 0, alone, LAYER, "none", num_splits=16))


def test_half_precision_inputs_against_the_float32_twin():
    """float16 (the interpreter's dot mishandles bfloat16; bf16 is checked in the gpu tests):
    probabilities rounded to q's dtype for the PV product, accumulation in float32."""
    q, group, batch = make_case([Seq(300, 1), Seq(40, 30), Seq(5, 3)], heads=8, kv_heads=2, head_dim=256, page=16,
                                window=128, dtype=torch.float16, q_scale=256**-0.5)
    got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=2)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), twin_fp32(q, group, batch, "none"), atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("split", [1, 2])
def test_fp8_cache_with_bfloat16_queries_against_the_float32_twin(split):
    """An e4m3 cache under bfloat16 queries with `fp8_products_in_fp16`: the products take float16
    operands (e4m3 and the queries convert to them exactly), accumulation in float32, the output in
    bfloat16."""
    q, group, batch = make_case([Seq(300, 1), Seq(40, 30), Seq(5, 3)], heads=8, kv_heads=2, head_dim=256, page=16,
                                window=128, dtype=torch.bfloat16, q_scale=256**-0.5)
    fp8 = torch.float8_e4m3fn
    group = KVGroup(group.layer_type, group.layers, group.window, group.pool, group.k.to(fp8), group.v.to(fp8))
    tiles = DecodeTiles(fp8_products_in_fp16=True)
    got = paged_attention_triton(q, group, 0, batch, LAYER, "none", num_splits=split, tiles=tiles)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), twin_fp32(q, group, batch, "none"), atol=1e-2, rtol=2e-2)


def test_rows_selected_after_the_last_kv_owning_layer():
    """`select_rows` keeps only logits rows: positions of a sequence's rows are then not consecutive."""
    q, group, batch = make_case([Seq(8, 10), Seq(20, 1), Seq(5, 3)], heads=2, kv_heads=1, head_dim=16, page=4)
    rows = torch.tensor([3, 9, 12])
    sub = replace(batch, logits_rows=rows).select_rows(rows)
    assert sub.query_starts == (0, 2, 2, 3)  # the second sequence keeps no row
    torch.testing.assert_close(paged_attention_triton(q[rows], group, 0, sub, LAYER),
                               paged_attention(q[rows], group, 0, sub, LAYER), atol=2e-5, rtol=1e-4)


TINY = {
    "model_type": "gemma4_text", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "global_head_dim": 32, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2,
    "hidden_size_per_layer_input": 4, "num_kv_shared_layers": 1, "final_logit_softcapping": 30.0,
    "eos_token_id": 1, "max_position_embeddings": 256,
}


def decoders_agree(raw, device, prompt_lens, chunk):
    """Greedy tokens equal and every step's logits close, TextDecoder(kernels=True) against the
    PyTorch path, through the engine (prefill chunks, decodes, mixed steps, KV-shared layers)."""
    from gemma4_model.config import parse_config
    from gemma4_model.decoder import TextDecoder
    from gemma4_model.engine import Engine, SchedulerLimits
    from gemma4_model.kv_cache import PagedKVCache
    from gemma4_model.sampling import SamplingParams

    cfg = parse_config(raw).text
    torch.manual_seed(0)
    plain = TextDecoder(cfg).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.3)
    fast = TextDecoder(cfg, kernels=True).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.layers[0].self_attn.kernels and not plain.layers[0].self_attn.kernels
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in prompt_lens]
    runs = []
    for model in (plain.to(device), fast.to(device)):
        cache = PagedKVCache(cfg, page_size=4, num_pages=128, device=device)
        engine = Engine(model, cache, SchedulerLimits(chunk_size=chunk))
        with torch.inference_mode():
            runs.append(engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True, keep_logits=True)))
    for want, got in zip(*runs):
        assert got.output == want.output
        torch.testing.assert_close(torch.stack(got.step_logits), torch.stack(want.step_logits), atol=1e-4, rtol=1e-4)


MOE = dict(enable_moe_block=True, num_experts=6, top_k_experts=2, moe_intermediate_size=16,
           hidden_size_per_layer_input=0, num_kv_shared_layers=0)


def test_text_decoder_with_kernels_matches_without():
    decoders_agree(TINY, "cpu", (11, 5), chunk=8)  # the 11-token prompt takes two chunks


def test_moe_decoder_with_kernels_matches_without():
    """The MoE block's route, align, grouped products and combine kernels in the whole decoder."""
    decoders_agree(dict(TINY, **MOE), "cpu", (11, 5), chunk=8)


@pytest.mark.gpu
def test_gpu_text_decoder_with_kernels_matches_without():
    """float32 on the device (exact dots in the kernel), Gemma 4's head dims 256 / 512, GQA."""
    raw = dict(TINY, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=256,
               global_head_dim=512, sliding_window=16)
    decoders_agree(raw, "cuda", (45, 7, 30), chunk=16)
    decoders_agree(dict(raw, **MOE), "cuda", (45, 7, 30), chunk=16)


# --- GPU, real Gemma 4 shapes in bf16 --------------------------------------------------------------

E4B = dict(heads=8, sliding=(2, 256, 512), full=(2, 512, None))
G31B = dict(heads=32, sliding=(16, 256, 1024), full=(4, 512, None))


def assert_bf16_close(got, want):
    """bf16 output against the float32 twin: rounding of the output and of the probabilities."""
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    err = (got.float() - want).abs().max().item()
    rel = ((got.float() - want).norm() / want.norm()).item()
    assert err < 2e-2 and rel < 1e-2, f"max abs error {err}, relative error {rel}"


def gpu_check(seqs, heads, kv_heads, head_dim, window, span_mode="none", num_splits=None, seed=0, tiles=None):
    # q scaled so scores are about unit normal: soft attention over thousands of keys, the hard case
    # for accumulation (unscaled random q, k give nearly one-hot attention).
    for q_scale in (head_dim**-0.5, 1.0):
        q, group, batch = make_case(seqs, heads=heads, kv_heads=kv_heads, head_dim=head_dim, page=16, window=window,
                                    dtype=torch.bfloat16, device="cuda", seed=seed, q_scale=q_scale)
        want = twin_fp32(q, group, batch, span_mode)
        assert_bf16_close(paged_attention_triton(q, group, 0, batch, LAYER, span_mode, num_splits=num_splits,
                                                 tiles=tiles), want)
        del group, want


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["e4b", "31b"])
@pytest.mark.parametrize("layer", ["sliding", "full"])
@pytest.mark.parametrize("batch_size", [1, 64])
def test_gpu_tma_decode_up_to_8k(model, layer, batch_size):
    """`DecodeTiles(tma_stages=3)` (head dims 256 and 512) against the float32 twin."""
    spec = {"e4b": E4B, "31b": G31B}[model]
    kv_heads, head_dim, window = spec[layer]
    lens = torch.randint(1, 8192, (batch_size,), generator=torch.Generator().manual_seed(batch_size)).tolist()
    seqs = [Seq(n, 1) for n in [8191, *lens[1:]]]
    for splits in (None, 1):
        gpu_check(seqs, spec["heads"], kv_heads, head_dim, window, num_splits=splits, tiles=DecodeTiles(tma_stages=3))


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["e4b", "31b"])
@pytest.mark.parametrize("layer", ["sliding", "full"])
@pytest.mark.parametrize("batch_size", [1, 8, 64])
def test_gpu_decode_up_to_8k(model, layer, batch_size):
    spec = {"e4b": E4B, "31b": G31B}[model]
    kv_heads, head_dim, window = spec[layer]
    g = torch.Generator().manual_seed(batch_size)
    lens = torch.randint(1, 8192, (batch_size,), generator=g).tolist()
    lens[0] = 8191
    seqs = [Seq(n, 1) for n in lens]
    gpu_check(seqs, spec["heads"], kv_heads, head_dim, window)
    if batch_size == 1:
        gpu_check(seqs, spec["heads"], kv_heads, head_dim, window, num_splits=1)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["e4b", "31b"])
@pytest.mark.parametrize("layer", ["sliding", "full"])
def test_gpu_prefill_chunk_2k_mixed_with_decodes_and_verifies(model, layer):
    spec = {"e4b": E4B, "31b": G31B}[model]
    kv_heads, head_dim, window = spec[layer]
    seqs = [Seq(3000, 2048), Seq(4000, 1), Seq(700, 5), Seq(0, 300), Seq(1, 1)]
    gpu_check(seqs, spec["heads"], kv_heads, head_dim, window)


@pytest.mark.gpu
@pytest.mark.parametrize("span_mode", ["windowed", "override"])
def test_gpu_image_spans(span_mode):
    spans = tuple([0] * 100 + [1] * 280 + [0] * 20 + [2] * 280 + [0] * 40)
    seqs = [Seq(1000, len(spans), spans), Seq(5000, 1)]
    gpu_check(seqs, 8, 2, 256, 512, span_mode=span_mode)


def _cuda_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


@pytest.mark.gpu
@pytest.mark.parametrize("batch_size", [1, 32])
def test_gpu_decode_timing_against_the_twin(batch_size):
    """Not a benchmark assertion: prints kernel and twin times for E4B-shaped 4k decodes."""
    for layer, (kv_heads, head_dim, window) in (("sliding", E4B["sliding"]), ("full", E4B["full"])):
        q, group, batch = make_case([Seq(4095, 1)] * batch_size, heads=8, kv_heads=kv_heads, head_dim=head_dim,
                                    page=16, window=window, dtype=torch.bfloat16, device="cuda")
        kernel = _cuda_ms(lambda: paged_attention_triton(q, group, 0, batch, LAYER))
        twin = _cuda_ms(lambda: paged_attention(q, group, 0, batch, LAYER), reps=3)
        assert_bf16_close(paged_attention_triton(q, group, 0, batch, LAYER), twin_fp32(q, group, batch, "none"))
        print(f"\nE4B {layer} decode, batch {batch_size}, 4k context: kernel {kernel:.3f} ms, twin {twin:.3f} ms")


def _compiled(kernel) -> set:
    """The keys of the variants of a Triton kernel compiled in this process, on any device."""
    return {key for binder in kernel.device_caches.values() for key in binder[0]}


@pytest.mark.gpu
def test_gpu_batches_of_any_size_reuse_the_compiled_kernels():
    """A server's batches vary in rows, programs and page-table width at every step; none of these
    may compile a new variant (each compile stalls the engine for about a second)."""
    from gemma4_model.kernels import paged_attention as module

    kv_heads, head_dim, window = E4B["sliding"]

    def run(seqs):
        q, group, batch = make_case(seqs, heads=8, kv_heads=kv_heads, head_dim=head_dim, page=16, window=window,
                                    dtype=torch.bfloat16, device="cuda")
        paged_attention_triton(q, group, 0, batch, LAYER)

    kernels = (module._paged_attention_kernel, module._merge_splits_kernel, module._paged_decode_tma_kernel)
    # decode batches compile one variant per split count (and kernel) at most: sizes that give each
    # count first, then other sizes and lengths
    first = [[Seq(37 * i + 3, 1) for i in range(n)] for n in (1, 4, 8, 20, 40, 80)]
    decode = [[Seq(53 * i + 7, 1) for i in range(n)] for n in (2, 3, 15, 16, 17, 33, 64, 100, 130)]
    for seqs in first:
        run(seqs)
    cap = max(2, module._pow2(-(-window // module.SPLIT_BLOCK)))  # the window's (`default_num_splits`)
    counts = {min(cap, decode_splits(len(seqs), kv_heads, DECODE_TILES.programs_per_sm, module._multiprocessors(
        torch.device("cuda")))) for seqs in first + decode}
    assert counts == {2, 4, 8, 16}, counts  # the sizes above reach every count under a 512-key window
    for tile, shapes in (("decode", [first[-1]] + decode),
                         ("prefill", [[Seq(0, 100)], [Seq(16, 64)], [Seq(300, 65), Seq(5, 1)],
                                      [Seq(1, 16), Seq(2, 16), Seq(4000, 16), Seq(9, 33)]])):
        run(shapes[0])
        before = [_compiled(k) for k in kernels]
        for seqs in shapes[1:]:
            run(seqs)
        after = [_compiled(k) for k in kernels]
        assert after == before, f"{tile} batches compiled new variants: {[a - b for a, b in zip(after, before)]}"
