"""Decode steps replayed as CUDA graphs give what the eager forward gives."""

from __future__ import annotations

import pytest
import torch

from gemma4_model.cuda_graphs import DEFAULT_BATCH_SIZES, can_capture, capture_sizes
from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.sampling import SamplingParams


def test_capture_sizes_reach_the_largest_batch():
    assert capture_sizes(1) == (1,)
    assert capture_sizes(10) == (1, 2, 4, 8, 10)
    assert capture_sizes(64) == tuple(s for s in DEFAULT_BATCH_SIZES if s <= 64)
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_what_cannot_be_captured(tiny_checkpoint):
    _, model = load_text_decoder(tiny_checkpoint("e4b"), device="cpu", dtype=torch.float32)
    assert "kernels" in can_capture(model)
    model.set_kernels(True)
    assert "CUDA" in can_capture(model)
    _, moe = load_text_decoder(tiny_checkpoint("26b_a4b"), device="cpu", dtype=torch.float32)
    moe.set_kernels(True)
    assert "MoE" in can_capture(moe)


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in (37, 9, 23, 61, 5)]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["e4b", "31b"])
def test_graph_replays_give_the_eager_tokens(tiny_checkpoint, variant):
    """Five sequences of different lengths (padded to the captured 8), finishing at different
    steps (the batch shrinks through 4, 2, 1), greedy, float32: the same tokens with and without
    graphs, and the graphs were used."""
    path = tiny_checkpoint(variant)
    outputs, engines = {}, {}
    for graphs in (False, True):
        config, model = load_text_decoder(path, device="cuda", dtype=torch.float32)
        model.set_kernels(True)
        cache = PagedKVCache(config.text, page_size=4, num_pages=160, device="cuda", dtype=torch.float32)
        engine = Engine(model, cache, SchedulerLimits(max_batch_tokens=64, max_running=8, chunk_size=16))
        if graphs:
            engine.capture_decode_graphs()
        params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (24, 7, 16, 30, 3)]
        seqs = [engine.add_request(p, sp) for p, sp in zip(prompts(), params)]
        while engine.scheduler.has_work():
            engine.step()
        outputs[graphs], engines[graphs] = [s.output for s in seqs], engine
    assert outputs[True] == outputs[False]
    graphs = engines[True].graphs
    assert graphs.sizes == (1, 2, 4, 8) and graphs.replays > 20
    cache = engines[True].cache
    assert all(n == 1 for n in cache.pages_in_use().values())  # the scratch page of each group
    graphs.close()
    assert not any(cache.pages_in_use().values())
