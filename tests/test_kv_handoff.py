"""KV handoff: prefill in one cache, hand the needed pages over, decode in another — the same
tokens as one colocated engine, with far fewer bytes than every layer and every token."""

import pytest
import torch

from gemma4_model.config import FULL, SLIDING
from gemma4_model.engine import Engine, GenerationSequence, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.page_pool import KVCacheFullError
from gemma4_model.sampling import SamplingParams
from transfer.kv_pages import export_pages, import_pages


@pytest.mark.parametrize("variant", ["e2b", "26b_a4b"])
def test_disaggregated_decode_equals_colocated(tiny_checkpoint, variant):
    config, model = load_text_decoder(tiny_checkpoint(variant))
    prompt = torch.randint(3, 250, (45,), generator=torch.Generator().manual_seed(9)).tolist()
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    [colocated] = Engine(model, PagedKVCache(config.text, page_size=4, num_pages=64)).generate([prompt], params)

    prefill_cache = PagedKVCache(config.text, page_size=4, num_pages=64)
    prefill = Engine(model, prefill_cache, SchedulerLimits(chunk_size=16))
    seq = prefill.add_request(prompt, params)
    while not seq.output:  # chunked prefill until the first token
        prefill.step()
    payload = export_pages(prefill_cache, seq.seq_id)
    prefill.cancel(seq)  # prefill's pages are free once handed over

    held = {name: len(g.logical) for name, g in payload.groups.items()}
    assert held[FULL] == 12  # every page of the 45 positions
    window_pages = -(-config.text.sliding_window // 4) + 1
    assert held.get(SLIDING, 0) <= window_pages  # only the last window of sliding pages
    naive = sum(2 * l.num_kv_heads * l.head_dim * 4 for l in config.text.layers) * len(prompt)
    assert payload.nbytes < naive

    decode_cache = PagedKVCache(config.text, page_size=4, num_pages=64)
    decode = Engine(model, decode_cache)
    moved = GenerationSequence(0, list(prompt), params, output=[seq.output[0]])
    import_pages(decode_cache, moved.seq_id, payload)
    decode.scheduler.adopt(moved)
    while decode.scheduler.has_work():
        decode.step()
    assert moved.output == colocated.output


def test_import_that_does_not_fit_leaves_nothing_allocated(tiny_checkpoint):
    config, model = load_text_decoder(tiny_checkpoint("e4b"))
    source = PagedKVCache(config.text, page_size=4, num_pages=64)
    engine = Engine(model, source)
    seq = engine.add_request(list(range(3, 43)), SamplingParams(max_tokens=4))
    while not seq.output:
        engine.step()
    payload = export_pages(source, seq.seq_id)
    engine.cancel(seq)
    small = PagedKVCache(config.text, page_size=4, num_pages=5)
    with pytest.raises(KVCacheFullError):
        import_pages(small, 0, payload)
    assert small.pages_in_use() == {SLIDING: 0, FULL: 0} and not small.has_sequence(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_payload_survives_the_wire(dtype):
    from actors.handoff import handoff_message, payload_of
    from actors.messages import SamplingSpec, decode, encode
    from transfer.kv_pages import GroupPages, KVPayload

    k = torch.randn(2, 3, 4, 1, 8).to(dtype)
    payload = KVPayload(10, {FULL: GroupPages((0, 1, 2), k, k * 2), SLIDING: GroupPages((2,), k[:, :1], k[:, :1])})
    msg = handoff_message("r", [5, 6, 7], 9, SamplingSpec(max_tokens=3), payload)
    back = payload_of(decode([bytes(f) for f in encode(msg)]))
    assert back.num_tokens == 10 and back.groups[FULL].logical == (0, 1, 2)
    assert back.groups[FULL].k.dtype == dtype and torch.equal(back.groups[FULL].v, k * 2)
    assert torch.equal(back.groups[SLIDING].k, k[:, :1]) and back.nbytes == payload.nbytes
