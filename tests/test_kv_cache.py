"""Page pool and paged KV cache: allocation, window release, prefix reuse, no leaks."""

import pytest

from gemma4_model.config import FULL, SLIDING, parse_config
from gemma4_model.kv_cache import NO_PAGE, PagedKVCache, RequestTooLargeError
from gemma4_model.page_pool import KVCacheFullError, PagePool, page_hashes


def text_config(window=8, layers=6, shared=0):
    types = [SLIDING] * (layers - 1) + [FULL]
    if shared:
        types = [SLIDING, FULL] + [SLIDING] * (layers - 3) + [FULL]
    return parse_config({
        "model_type": "gemma4_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "global_head_dim": 16, "sliding_window": window, "layer_types": types, "num_kv_shared_layers": shared,
    }).text


def test_pool_refcounts_and_lru_eviction():
    pool = PagePool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    with pytest.raises(KVCacheFullError):
        pool.allocate()
    pool.publish(a, b"ha")
    pool.publish(b, b"hb")
    pool.release(b)
    pool.release(a)  # a is now the most recently used idle page
    assert pool.num_available == 2 and pool.num_cached == 2
    pool.acquire(pool.lookup(b"ha"))  # a hit keeps the page alive
    assert pool.refcount(a) == 1
    assert pool.allocate() == b  # the idle page b is evicted first
    assert pool.lookup(b"hb") is None
    pool.release_all([a, b, c])
    assert pool.num_in_use == 0


def test_allocate_many_takes_free_pages_then_evicts_and_is_all_or_nothing():
    pool = PagePool(5)
    a, b = pool.allocate(), pool.allocate()
    pool.publish(a, b"ha")
    pool.release(a)  # idle, cached
    with pytest.raises(KVCacheFullError, match="5 pages wanted, 4 of 5"):
        pool.allocate_many(5)
    assert pool.num_available == 4 and pool.lookup(b"ha") == a  # the refusal took nothing
    pages = pool.allocate_many(4)
    assert sorted(pages) == sorted({0, 1, 2, 3, 4} - {b}) and pages[-1] == a  # free pages first, the cached one last
    assert all(pool.refcount(p) == 1 for p in pages) and pool.lookup(b"ha") is None
    assert pool.allocate_many(0) == [] and pool.num_available == 0


def test_adopt_sequence_places_its_pages_and_refuses_pages_past_its_length():
    cache = PagedKVCache(text_config(window=8), page_size=4, num_pages=16)
    physical = cache.adopt_sequence(1, 18, {FULL: [0, 1, 2, 3, 4], SLIDING: [2, 3, 4]})
    for name, logical in ((FULL, [0, 1, 2, 3, 4]), (SLIDING, [2, 3, 4])):
        table = cache.page_table(1, name)
        assert [table[j] for j in logical] == physical[name] and len(set(physical[name])) == len(logical)
        assert all(table[j] == NO_PAGE for j in range(len(table)) if j not in logical)
    assert cache.held_pages(1) == {FULL: [0, 1, 2, 3, 4], SLIDING: [2, 3, 4]}
    for bad in ([0, 5], [-1, 0]):  # 18 positions are pages 0..4
        with pytest.raises(IndexError, match="outside 0..4"):
            cache.adopt_sequence(2, 18, {FULL: [0, 1, 2, 3, 4], SLIDING: bad})
        assert not cache.has_sequence(2) and cache.pages_in_use() == {FULL: 5, SLIDING: 3}  # nothing kept
    with pytest.raises(ValueError, match="page numbers repeat"):
        cache.adopt_sequence(3, 18, {FULL: [0, 1, 1, 3, 4]})
    with pytest.raises(KVCacheFullError):
        cache.adopt_sequence(3, 80, {FULL: list(range(20))})
    assert cache.pages_in_use() == {FULL: 5, SLIDING: 3}
    cache.free_sequence(1)
    assert cache.pages_in_use() == {FULL: 0, SLIDING: 0}


def test_page_hashes_chain_and_extra_keys():
    h1 = page_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    h2 = page_hashes([1, 2, 3, 4, 5, 6, 7, 0], 4)
    assert len(h1) == 2 and h1[0] == h2[0] and h1[1] != h2[1]
    assert page_hashes([1, 2, 3, 4], 4, [b"img-a"]) != page_hashes([1, 2, 3, 4], 4, [b"img-b"])
    assert page_hashes([9, 9, 9, 9, 1, 2, 3, 4], 4)[1] != page_hashes([0, 0, 0, 0, 1, 2, 3, 4], 4)[1]


def test_page_hashes_continue_from_known_pages():
    """A growing sequence hashes only its new pages, to the same chain; `num_pages` stops early;
    a page's bytes are its ids as signed 4-byte little-endian integers."""
    import hashlib

    tokens = list(range(-3, 40))
    whole = page_hashes(tokens, 4)
    assert page_hashes(tokens, 4, known=whole[:3]) == whole
    assert page_hashes(tokens, 4, num_pages=5) == whole[:5]
    assert page_hashes(tokens, 4, known=whole, num_pages=2) == whole[:2]
    first = hashlib.blake2b(b"", digest_size=16)
    first.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens[:4]))
    assert whole[0] == first.digest()


def test_sliding_group_holds_at_most_a_window():
    cfg = text_config(window=8)
    cache = PagedKVCache(cfg, page_size=4, num_pages=32)
    cache.add_sequence(0, list(range(1, 41)))
    for pos in range(40):  # one token at a time, as decode does
        cache.slide(0, pos)
        cache.extend(0, pos + 1)
        held = [p for p in cache.page_table(0, SLIDING) if p != NO_PAGE]
        assert len(held) <= cache.pages_for(SLIDING, pos, pos + 1)
        assert len(cache.page_table(0, FULL)) == pos // 4 + 1
    assert cache.page_table(0, SLIDING)[:8] == [NO_PAGE] * 8
    cache.free_sequence(0)
    assert cache.pages_in_use() == {SLIDING: 0, FULL: 0}


def test_slide_after_a_truncation_below_the_window_releases_the_new_pages():
    """Slides resume where the last one stopped; a truncation below that point rewinds it, so
    pages appended there again are released when the window leaves them."""
    cfg = text_config(window=8)
    cache = PagedKVCache(cfg, page_size=4, num_pages=32)
    cache.add_sequence(0, list(range(1, 41)))
    cache.extend(0, 40)
    cache.slide(0, 40)
    assert cache.pages_in_use()[SLIDING] == 2  # the pages below (40 - 8 + 1) // 4 = 8 are gone
    cache.truncate(0, 4)
    cache.extend(0, 40)
    cache.slide(0, 40)
    assert cache.page_table(0, SLIDING)[:8] == [NO_PAGE] * 8 and cache.pages_in_use()[SLIDING] == 2
    cache.free_sequence(0)
    assert cache.pages_in_use() == {SLIDING: 0, FULL: 0}


def test_kv_shared_layers_own_no_storage():
    cfg = text_config(layers=8, shared=3)
    cache = PagedKVCache(cfg, page_size=4, num_pages=4)
    assert cache.groups[SLIDING].layers == (0, 2, 3, 4) and cache.groups[FULL].layers == (1,)
    assert cache.groups[SLIDING].k.shape == (4, 4, 4, 2, 8)
    assert cache.groups[FULL].k.shape == (1, 4, 4, 2, 16)


def test_prefix_reuse_needs_last_window_only_and_is_refcounted():
    cfg = text_config(window=8)
    cache = PagedKVCache(cfg, page_size=4, num_pages=16)
    prompt = list(range(1, 22))  # 21 tokens: 5 full pages
    assert cache.add_sequence(0, prompt) == 0
    cache.extend(0, 21)
    cache.commit(0, prompt, 21)
    cache.slide(0, 21)  # sliding pages 0..2 leave the window but stay cached
    second = prompt[:20] + [63, 62, 61]
    assert cache.add_sequence(1, second) == 20
    full0, full1 = cache.page_table(0, FULL), cache.page_table(1, FULL)
    assert full1 == full0[:5]
    assert all(cache.groups[FULL].pool.refcount(p) == 2 for p in full1)
    sliding1 = cache.page_table(1, SLIDING)
    assert sliding1[:3] == [NO_PAGE] * 3 and NO_PAGE not in sliding1[3:]
    cache.free_sequence(0)
    cache.free_sequence(1)
    assert cache.pages_in_use() == {SLIDING: 0, FULL: 0}


def test_extend_is_all_or_nothing_and_oversize_requests_are_refused():
    cfg = text_config(window=8)
    cache = PagedKVCache(cfg, page_size=4, num_pages=4)
    cache.add_sequence(0, [1] * 30)
    with pytest.raises(KVCacheFullError):
        cache.extend(0, 30)
    assert cache.pages_in_use() == {SLIDING: 0, FULL: 0}
    assert not cache.can_extend([(0, 30)]) and cache.can_extend([(0, 16)])
    with pytest.raises(RequestTooLargeError, match="pages; the pool has 4"):
        cache.check_fits(max_tokens=30, chunk=8)
    cache.free_sequence(0)


def test_truncate_drops_rejected_positions():
    cfg = text_config(window=8)
    cache = PagedKVCache(cfg, page_size=4, num_pages=8)
    cache.add_sequence(0, [1] * 6)
    cache.extend(0, 12)
    cache.truncate(0, 7)
    assert len(cache.page_table(0, FULL)) == 2 and cache.pages_in_use()[FULL] == 2
    cache.free_sequence(0)
    assert cache.pages_in_use() == {SLIDING: 0, FULL: 0}


def test_full_layers_count_every_page_from_the_start():
    cfg = text_config(window=8)
    cache = PagedKVCache(cfg, page_size=4, num_pages=16)
    assert cache.pages_for(FULL, 40, 48) == 12
    assert cache.pages_for(SLIDING, 40, 48) == 12 - (40 - 8 + 1) // 4
    with pytest.raises(RequestTooLargeError, match="full_attention"):
        cache.check_fits(max_tokens=80, chunk=8)  # 20 full pages, however small the chunk
