"""Scheduler and engine: admission, waiting, preemption, refusal, stop conditions, no leaks."""

import pytest
import torch

from gemma4_model.config import FULL, SLIDING, parse_config
from gemma4_model.decoder import TextDecoder
from gemma4_model.engine import Engine, GenerationSequence, SchedulerLimits, Status
from gemma4_model.kv_cache import PagedKVCache, RequestTooLargeError
from gemma4_model.sampling import SamplingParams

RAW = {
    "model_type": "gemma4_text", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
    "global_head_dim": 16, "sliding_window": 8, "layer_types": [SLIDING, FULL, SLIDING, FULL],
    "hidden_size_per_layer_input": 4, "num_kv_shared_layers": 1, "final_logit_softcapping": 30.0,
    "eos_token_id": 1, "max_position_embeddings": 256,
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TextDecoder(parse_config(RAW).text).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def prompts(n, length=13):
    g = torch.Generator().manual_seed(n)
    return [torch.randint(2, 96, (length + 3 * i,), generator=g).tolist() for i in range(n)]


def run(model, pages, ps, params, limits=SchedulerLimits()):
    cache = PagedKVCache(model.cfg, page_size=4, num_pages=pages)
    engine = Engine(model, cache, limits)
    seqs = engine.generate(ps, params)
    assert all(v == 0 for v in cache.pages_in_use().values())
    return engine, [s.output for s in seqs]


def test_small_pool_waits_and_preempts_but_outputs_do_not_change(model):
    ps = prompts(6)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    _, roomy = run(model, 200, ps, params)
    engine, tight = run(model, 14, ps, params, SchedulerLimits(chunk_size=8))
    assert tight == roomy
    assert engine.stats.prefill_tokens > sum(map(len, ps))  # some sequences were recomputed


def test_request_that_can_never_fit_is_refused_with_a_typed_error(model):
    cache = PagedKVCache(model.cfg, page_size=4, num_pages=4)
    engine = Engine(model, cache)
    with pytest.raises(RequestTooLargeError):
        engine.add_request(list(range(2, 30)), SamplingParams(max_tokens=8))
    with pytest.raises(RequestTooLargeError, match="model length"):
        engine.add_request([5] * 250, SamplingParams(max_tokens=8))
    with pytest.raises(ValueError):
        engine.add_request([], SamplingParams(max_tokens=8))
    assert not engine.scheduler.has_work()
    # a context length below the model's (SGLang's --context-length) refuses what passes the model's
    capped = Engine(model, PagedKVCache(model.cfg, page_size=4, num_pages=64), SchedulerLimits(max_model_len=40))
    with pytest.raises(RequestTooLargeError, match="= 41 exceeds the model length 40"):
        capped.add_request(list(range(2, 35)), SamplingParams(max_tokens=8))
    capped.add_request(list(range(2, 34)), SamplingParams(max_tokens=8))  # 40: fits
    assert Engine(model, cache, SchedulerLimits(max_model_len=10**6)).scheduler.max_model_len == 256  # the model's


def test_stop_tokens_eos_and_length(model):
    ps = prompts(1)
    _, [free] = run(model, 64, ps, SamplingParams(max_tokens=12, ignore_eos=True))
    stop = free[5]
    cache = PagedKVCache(model.cfg, page_size=4, num_pages=64)
    engine = Engine(model, cache)
    seq = engine.add_request(ps[0], SamplingParams(max_tokens=12, stop_token_ids=(stop,)))
    while engine.scheduler.has_work():
        engine.step()
    assert seq.status is Status.FINISHED and seq.finish_reason == "stop"
    assert seq.output == free[: free.index(stop) + 1]
    long = engine.add_request(ps[0], SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.scheduler.has_work():
        engine.step()
    assert long.finish_reason == "length" and len(long.output) == 3


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(model):
    ps = prompts(2)
    sampled = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, top_k=40, seed=7, ignore_eos=True)
    _, a = run(model, 64, ps, sampled)
    _, b = run(model, 64, ps, sampled)
    _, greedy = run(model, 64, ps, SamplingParams(max_tokens=16, ignore_eos=True))
    assert a == b and a != greedy


def test_sampling_params_are_validated():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_token_slice_and_count_equal_the_token_list():
    from gemma4_model.engine import GenerationSequence
    from gemma4_model.sampling import SamplingParams

    seq = GenerationSequence(0, [5, 6, 7, 8], SamplingParams(), output=[9, 10, 11])
    assert seq.num_tokens == len(seq.tokens) == 7
    for start in range(8):
        for end in range(start, 9):
            assert seq.token_slice(start, end) == seq.tokens[start:end], (start, end)


def test_token_view_reads_prompt_and_output_in_place():
    seq = GenerationSequence(0, [1, 2, 3, 4, 5], SamplingParams())
    seq.output += [6, 7]
    view = seq.token_view
    assert len(view) == 7 and list(view) == seq.tokens == [1, 2, 3, 4, 5, 6, 7]
    assert view[3:6] == [4, 5, 6] and view[5:] == [6, 7] and view[::3] == [1, 4, 7]
    assert view[0] == 1 and view[5] == 6 and view[-1] == 7
    seq.output.append(8)  # a view, not a copy
    assert len(view) == 8 and view[-1] == 8
