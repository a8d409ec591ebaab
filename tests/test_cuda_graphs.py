"""Decode steps replayed as CUDA graphs give what the eager forward gives."""

from __future__ import annotations

import pytest
import torch

from gemma4_model.cuda_graphs import DEFAULT_BATCH_SIZES, ChunkInputs, can_capture, capture_sizes, logits_seqs
from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kernels.l2_prefetch import WeightPrefetch
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.media_span import MediaSpan, MediaTokens
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
    moe.set_kernels(True)  # experts as grouped products: only the device is missing
    assert "CUDA" in can_capture(moe)


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in (37, 9, 23, 61, 5)]


def greedy_outputs(path, decode_graphs: bool, chunk_graphs: bool,
                   prefetch: dict | None = None) -> tuple[list[list[int]], Engine]:
    """Five sequences of different lengths (prompt chunks of 16 beside decodes; decode batches
    padded to the captured 8), finishing at different steps (the batch shrinks through 4, 2, 1),
    greedy, float32, on the GPU; `prefetch`: a `WeightPrefetch`'s arguments, to run with one."""
    config, model = load_text_decoder(path, device="cuda", dtype=torch.float32)
    model.set_kernels(True)
    if prefetch is not None:
        model.weight_prefetch = WeightPrefetch(torch.device("cuda", torch.cuda.current_device()), **prefetch)
    cache = PagedKVCache(config.text, page_size=4, num_pages=160, device="cuda", dtype=torch.float32)
    engine = Engine(model, cache, SchedulerLimits(max_batch_tokens=64, max_running=8, chunk_size=16))
    if decode_graphs:
        engine.capture_decode_graphs()
    if chunk_graphs:
        engine.capture_chunk_graphs()
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (24, 7, 16, 30, 3)]
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts(), params)]
    while engine.scheduler.has_work():
        engine.step()
    return [s.output for s in seqs], engine


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["e4b", "31b", "26b_a4b"])
def test_graph_replays_give_the_eager_tokens(tiny_checkpoint, variant):
    """The same tokens with and without decode graphs, and the graphs were used."""
    path = tiny_checkpoint(variant)
    want, _ = greedy_outputs(path, False, False)
    got, engine = greedy_outputs(path, True, False)
    assert got == want
    assert engine.graphs.sizes == (1, 2, 4, 8) and engine.graphs.replays > 20
    close_graphs(engine, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["e4b", "31b", "26b_a4b"])
def test_chunk_graph_replays_give_the_eager_tokens(tiny_checkpoint, variant):
    """Every step replayed (the 4 with prompt chunks padded to 64 rows and 8 sequences): the eager tokens."""
    path = tiny_checkpoint(variant)
    want, _ = greedy_outputs(path, False, False)
    got, engine = greedy_outputs(path, True, True)
    assert got == want
    assert engine.chunk_graphs.sizes == (64,) and engine.chunk_graphs.replays == 4  # the steps with prompt chunks
    close_graphs(engine, 2)


@pytest.mark.gpu
def test_chunk_graphs_replay_image_prompts(tiny_checkpoint):
    """An image prompt (bidirectional over its soft tokens) beside text prompts, float32: the same
    greedy tokens eager and with both kinds of graphs, the image's prompt chunk replayed."""
    path = tiny_checkpoint("e4b", use_bidirectional_attention="vision")
    outputs = []
    for graphs in (False, True):
        config, model = load_text_decoder(path, device="cuda", dtype=torch.float32)
        model.set_kernels(True)
        cache = PagedKVCache(config.text, page_size=4, num_pages=160, device="cuda", dtype=torch.float32)
        engine = Engine(model, cache, SchedulerLimits(max_batch_tokens=64, max_running=8, chunk_size=32))
        if graphs:
            engine.capture_decode_graphs()
            engine.capture_chunk_graphs()
        image = MediaTokens.from_special_tokens(config.special_tokens).image
        soft = torch.randn((12, config.text.hidden_size), generator=torch.Generator().manual_seed(1)).cuda()
        seqs = [engine.add_request([5, 6, 7] + [image] * 12 + [9, 10], SamplingParams(max_tokens=12, ignore_eos=True),
                                   media=[MediaSpan(3, soft, "image", b"img")])]
        seqs += [engine.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True)) for p in prompts()[:3]]
        while engine.scheduler.has_work():
            engine.step()
        outputs.append([s.output for s in seqs])
    assert outputs[0] == outputs[1]
    assert engine.chunk_graphs.replays >= 2
    close_graphs(engine, 2)


def close_graphs(engine: Engine, captures: int) -> None:
    """Each capture held a scratch page per group until closed."""
    assert all(n == captures for n in engine.cache.pages_in_use().values())
    for graphs in (engine.graphs, engine.chunk_graphs):
        if graphs is not None:
            graphs.close()
    assert not any(engine.cache.pages_in_use().values())


def test_chunk_inputs_give_the_eager_rows(tiny_checkpoint):
    """Steps with prompt chunks (an image prompt with bidirectional attention over its soft tokens
    and a text prompt's first chunk filling the token budget; then a later chunk over a cached
    prefix, a new prompt and a decode) copied into one set of fixed inputs (every row taken, then
    padding rows; idle sequences; the unused soft-token entries on the sink row; one row per
    sequence past the KV-owning layers) give the eager forward's final hidden states at their
    logits rows (CPU: the kernels in Triton's interpreter; the same code fills a captured graph's
    inputs)."""
    # four layers (a sliding and a full owner, then one KV-shared layer of each): Triton's
    # interpreter runs every program of every launch in turn, and the twelve-layer tiny E4B takes
    # three times as long for nothing more
    layers = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2)
    config, model = load_text_decoder(tiny_checkpoint("e4b", use_bidirectional_attention="vision", **layers),
                                      device="cpu", dtype=torch.float32)
    cache = PagedKVCache(config.text, page_size=4, num_pages=120, device="cpu", dtype=torch.float32)
    engine = Engine(model, cache, SchedulerLimits(max_batch_tokens=40, max_running=4, chunk_size=24))
    scratch = {name: group.pool.allocate() for name, group in cache.groups.items()}
    max_pages = -(-engine.scheduler.max_model_len // cache.page_size)
    inputs = ChunkInputs(cache, 40, 6, max_pages, scratch, torch.device("cpu"), config.text.hidden_size, torch.float32,
                         narrow=True)  # one row per sequence through the KV-shared layers
    model.set_kernels(True)
    model.final_hidden(inputs.batch, cache, inputs.narrowed)
    inputs.fix_schedules()
    model.set_kernels(False)
    checked = []
    eager = engine._forward

    def forward_and_check(batch):
        out = eager(batch)  # the PyTorch twin
        if batch.token_ids.shape[0] > batch.num_seqs and len(checked) < 2:  # a prompt chunk in the step
            assert inputs.fits(batch)
            inputs.load(batch)
            for name, scratch_page in scratch.items():  # a narrowed idle or padding row's key 0 is on a page
                assert (inputs.batch.groups[name].page_tables[batch.num_seqs:, 0] == scratch_page).all()
            model.set_kernels(True)
            hidden = model.final_hidden(inputs.batch, cache, inputs.narrowed)
            model.set_kernels(False)
            assert hidden.shape[0] == 7  # a row per sequence: the step's, then the idle and padding ones
            torch.testing.assert_close(hidden[logits_seqs(batch)], out.hidden, atol=1e-4, rtol=1e-4)
            checked.append((batch.token_ids.shape[0], batch.num_seqs, batch.media_rows is not None))
        return out

    engine._forward = forward_and_check
    image = MediaTokens.from_special_tokens(config.special_tokens).image
    soft = torch.randn((8, config.text.hidden_size), generator=torch.Generator().manual_seed(0))
    engine.add_request([5, 6, 7, 8] + [image] * 8 + [9, 10, 11, 12], SamplingParams(max_tokens=2, ignore_eos=True),
                       media=[MediaSpan(4, soft, "image", b"img")])
    for prompt in prompts()[:2]:
        engine.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.scheduler.has_work():
        engine.step()
    for name, page in scratch.items():
        cache.groups[name].pool.release_all([page])
    assert checked == [(40, 2, True), (23, 3, False)], checked
