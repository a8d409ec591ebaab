"""gemma4_model/memory.py: an engine whose KV pool leaves too little device memory for a step at
its largest batch stops at start-up with the setting to lower, not at its first large batch."""

import pytest

from gemma4_model.memory import MARGIN_BYTES, HeadroomError, check_headroom, step_headroom_bytes


def test_a_step_needs_its_logits_copies_and_a_margin():
    one = step_headroom_bytes(1, 262144)
    assert step_headroom_bytes(128, 262144) - MARGIN_BYTES == 128 * (one - MARGIN_BYTES)
    assert 0.8 * 2**30 < step_headroom_bytes(128, 262144) < 1.2 * 2**30  # 26B-A4B's vocabulary, 128 sequences
    for bad in ((0, 10), (10, 0)):
        with pytest.raises(ValueError, match="positive"):
            step_headroom_bytes(*bad)


def test_too_little_left_is_a_clear_start_up_error():
    need = step_headroom_bytes(128, 262144)
    check_headroom(need, 128, 262144, "engine 0 on cuda:0")  # exactly enough
    with pytest.raises(HeadroomError, match=r"engine 0 on cuda:0: 0\.50 GiB .* 128 sequences .* model\.kv_pages"):
        check_headroom(2**29, 128, 262144, "engine 0 on cuda:0")


def test_a_share_of_the_device_sizes_the_kv_pool():
    from gemma4_model.memory import kv_pages_for_share

    gib = 2**30
    # 80 GiB device, 30 GiB free after the weights, 0.9 kept: 30 - 8 = 22 GiB of pages
    assert kv_pages_for_share(30 * gib, 80 * gib, 0.9, 1 << 20) == 22 * 1024
    with pytest.raises(HeadroomError, match="mem_fraction_static 0.5: 30.00 GiB of 80.00 GiB .* set kv_pages"):
        kv_pages_for_share(30 * gib, 80 * gib, 0.5, 1 << 20)  # 40 GiB kept: more than is free
    for share, page in ((0.0, 1), (1.0, 1), (0.5, 0)):
        with pytest.raises(ValueError, match="share"):
            kv_pages_for_share(gib, gib, share, page)


def test_page_bytes_are_what_the_cache_allocates_per_page():
    import torch

    from gemma4_model.config import parse_config
    from gemma4_model.kv_cache import PagedKVCache
    from gemma4_model.random_checkpoint import tiny_config

    for variant in ("e4b", "31b", "26b_a4b"):
        config = parse_config(tiny_config(variant).to_dict()).text
        for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
            cache = PagedKVCache(config, page_size=4, num_pages=3, dtype=dtype)
            allocated = sum(g.k.nbytes + g.v.nbytes for g in cache.groups.values())
            assert PagedKVCache.page_bytes(config, 4, dtype) * 3 == allocated, (variant, dtype)
