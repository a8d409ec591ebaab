"""Weights read into L2 ahead of their products (kernels/l2_prefetch.py): the kernel reads every
word of its region once, and a decode with prefetches gives the tokens of one without."""

from __future__ import annotations

import functools
import operator

import pytest
import torch

from gemma4_model.kernels.l2_prefetch import touch, words

from test_cuda_graphs import close_graphs, greedy_outputs


def xor_of(t: torch.Tensor) -> int:
    return functools.reduce(operator.xor, t.reshape(-1).tolist(), 0)


@pytest.mark.parametrize("shape, cols, dtype", [
    ((96, 256), None, torch.bfloat16),   # whole, contiguous: rows of 2048 words
    ((64, 200), 96, torch.bfloat16),     # the leading columns of each row
    ((3, 4), None, torch.bfloat16),
    ((40, 24), 10, torch.float32),
])
def test_touch_reads_each_word_of_its_region_once(shape, cols, dtype):
    """The programs' xors combine to the region's: a word left out or read twice (with random
    bits) changes it. Words outside the region (the columns past `cols`) are not read."""
    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(shape, generator=g).to(dtype)
    region = w if cols is None else w[:, :cols]
    for programs in (1, 3, 64):
        sink = torch.zeros(programs, dtype=torch.int32)
        touch(region, sink)
        assert xor_of(sink) == xor_of(words(region)) != 0
    if cols is not None:
        assert xor_of(words(region)) != xor_of(w.view(torch.int32))


def test_words_refuses_what_it_cannot_read():
    w = torch.zeros(8, 6, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="32-bit words"):
        words(w[:, :3])  # 6 bytes a row
    with pytest.raises(ValueError, match="unit column stride"):
        words(w.t())
    with pytest.raises(ValueError, match="2-D"):
        words(torch.zeros(4, dtype=torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["e4b", "26b_a4b"])
def test_gpu_decode_with_prefetches_gives_the_tokens_without(tiny_checkpoint, variant):
    """Eager and graph-replayed decodes with prefetches (o, the head of gate|up, the next q|k|v,
    the per-layer-embedding weights) give the eager tokens; the side stream's kernels ran."""
    path = tiny_checkpoint(variant)
    want, _ = greedy_outputs(path, False, False)
    eager, engine = greedy_outputs(path, False, False, prefetch=dict(mlp_fraction=0.5))
    assert eager == want
    assert engine.model.weight_prefetch.sink.any()
    got, engine = greedy_outputs(path, True, False, prefetch=dict(mlp_fraction=0.5, max_rows=4))
    assert got == want
    assert engine.graphs.replays > 20
    close_graphs(engine, 1)
