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
