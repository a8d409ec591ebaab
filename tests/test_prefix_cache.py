"""Prefix caching end to end: a shared 300-token prefix is computed once and gives the same logits."""

import torch

from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.sampling import SamplingParams


def test_shared_prefix_computes_only_new_tokens(tiny_checkpoint):
    config, model = load_text_decoder(tiny_checkpoint("e4b"))  # PLE, KV sharing, window 16
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 256, (300,), generator=g).tolist()
    first = prefix + torch.randint(3, 256, (20,), generator=g).tolist()
    second = prefix + torch.randint(3, 256, (25,), generator=g).tolist()
    params = SamplingParams(max_tokens=4, ignore_eos=True, keep_logits=True)

    cache = PagedKVCache(config.text, page_size=4, num_pages=200)
    engine = Engine(model, cache, SchedulerLimits(chunk_size=64))
    engine.generate([first], params)
    [shared] = engine.generate([second], params)
    assert shared.num_cached_prompt_tokens == 300
    assert shared.num_computed_tokens == 25 + (params.max_tokens - 1)  # new prompt tokens + decodes

    fresh_cache = PagedKVCache(config.text, page_size=4, num_pages=200)
    [alone] = Engine(model, fresh_cache, SchedulerLimits(chunk_size=64)).generate([second], params)
    assert alone.num_cached_prompt_tokens == 0 and alone.num_computed_tokens == 325 + 3
    assert shared.output == alone.output
    for with_cache, without in zip(shared.step_logits, alone.step_logits):
        # float32; the chunking differs (cached prefix vs fresh), so summation order does too
        assert torch.allclose(with_cache, without, rtol=1e-4, atol=1e-4)


def test_prefix_pages_survive_until_evicted_then_recompute(tiny_checkpoint):
    config, model = load_text_decoder(tiny_checkpoint("e4b"))
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 256, (60,), generator=g).tolist()
    other = torch.randint(3, 256, (60,), generator=g).tolist()
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    cache = PagedKVCache(config.text, page_size=4, num_pages=20)  # room for about one request
    engine = Engine(model, cache)
    [a] = engine.generate([prompt], params)
    [b] = engine.generate([prompt], params)
    assert b.num_cached_prompt_tokens == 56 and b.output == a.output
    engine.generate([other], params)  # its pages evict the cached prompt's
    [c] = engine.generate([prompt], params)
    assert c.num_cached_prompt_tokens < 56 and c.output == a.output
