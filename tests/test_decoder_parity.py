"""Our decoder against transformers 5.23 on tiny random checkpoints of every variant (float32, CPU)."""

import pytest
import torch

from gemma4_model.batch import ForwardBatch, SequenceChunk
from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.sampling import SamplingParams
from gemma4_model.random_checkpoint import VARIANTS, load_reference, reference_greedy, reference_logits

PAGE = 4
WINDOW = 16  # the tiny configs' sliding window; prompts below are longer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def prompt(seed: int, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def assert_no_pages_in_use(cache: PagedKVCache) -> None:
    assert all(n == 0 for n in cache.pages_in_use().values()), cache.pages_in_use()


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, tiny_checkpoint):
    path = tiny_checkpoint(request.param)
    config, model = load_text_decoder(path)
    return request.param, config, model, load_reference(path, request.param)


def test_prefill_logits_match(variant):
    name, config, model, ref = variant
    ids = prompt(1, 40, config.text.vocab_size)
    assert len(ids) > config.text.sliding_window
    cache = PagedKVCache(config.text, page_size=PAGE, num_pages=64)
    cache.add_sequence(0, ids)
    cache.extend(0, len(ids))
    batch = ForwardBatch.build([SequenceChunk(0, ids, 0, logits_rows=tuple(range(len(ids))))], cache)
    with torch.inference_mode():
        ours = model(batch, cache).logits
    assert rel_err(ours, reference_logits(ref, ids)) < 1e-4
    cache.free_sequence(0)
    assert_no_pages_in_use(cache)


def test_greedy_64_tokens_match_generate(variant):
    name, config, model, ref = variant
    ids = prompt(2, 37, config.text.vocab_size)
    cache = PagedKVCache(config.text, page_size=PAGE, num_pages=64)
    engine = Engine(model, cache, SchedulerLimits(chunk_size=16))  # prompt spans three chunks
    [seq] = engine.generate([ids], SamplingParams(max_tokens=64, ignore_eos=True))
    assert seq.output == reference_greedy(ref, ids, 64)
    assert_no_pages_in_use(cache)


def test_mixed_batch_of_prefill_chunks_and_decodes(variant):
    name, config, model, ref = variant
    prompts = [prompt(10 + i, n, config.text.vocab_size) for i, n in enumerate((5, 23, 41, 9))]
    cache = PagedKVCache(config.text, page_size=PAGE, num_pages=96)
    # A small token budget makes later prompts' chunks share steps with earlier ones' decodes.
    engine = Engine(model, cache, SchedulerLimits(max_batch_tokens=12, chunk_size=8))
    seqs = [engine.add_request(p, SamplingParams(max_tokens=24, ignore_eos=True)) for p in prompts]
    while engine.scheduler.has_work():
        engine.step()
    assert engine.stats.mixed_steps > 0
    for p, seq in zip(prompts, seqs):
        assert seq.output == reference_greedy(ref, p, 24)
    assert_no_pages_in_use(cache)
