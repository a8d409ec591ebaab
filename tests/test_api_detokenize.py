"""Incremental detokenization across multi-byte characters and merges, stop strings across
token boundaries, and a choice's text / finish reason / logprob mapping from token batches."""

import random

import numpy as np
import pytest

from actors.messages import TokenBatch
from api.detokenize import IncrementalDetokenizer, StopStringMatcher
from api.formats import ChatFormat, CompletionFormat
from api.generation import Choice
from api.logprobs import TokenText


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from default_model import CHECKPOINT

    return AutoTokenizer.from_pretrained(CHECKPOINT)


TEXTS = ["héllo wörld — 日本語 😀 ok", "naïve café: 3+4=7\n\tтест 🎉🎉", "plain ascii words only"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_incremental_text_equals_full_decode(tokenizer, text, step):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids) or text.isascii()  # really splits characters
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


class DecodeOnly:
    """A tokenizer with `decode` and no Rust backend to call directly."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


@pytest.mark.parametrize("direct", [True, False], ids=["rust-decoder", "decode"])
def test_random_id_sequences_match_full_decode(tokenizer, direct):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(30):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tokenizer if direct else DecodeOnly(tokenizer))
        assert (detok.backend is not None) == direct
        text = "".join(detok.add([i]) for i in ids) + detok.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def feed_all(matcher, pieces):
    out = [matcher.feed(p) for p in pieces]
    return out, "".join(out) + matcher.flush()


def test_stop_string_across_pieces_is_cut_and_held_back():
    matcher = StopStringMatcher(["STOP"])
    out, text = feed_all(matcher, ["abc S", "T", "O", "P and more"])
    assert text == "abc " and matcher.stopped
    assert out[:3] == ["abc ", "", ""]  # "S", "ST", "STO" could start the stop string: held back


def test_false_start_is_released():
    matcher = StopStringMatcher(["STOP"])
    out, text = feed_all(matcher, ["x ST", "ART y"])
    assert text == "x START y" and not matcher.stopped
    assert out == ["x ", "START y"]


def test_earliest_of_several_stops_and_tail_flush():
    matcher = StopStringMatcher(["world", "lo w"])
    assert feed_all(matcher, ["hel", "lo wor", "ld"])[1] == "hel"
    matcher = StopStringMatcher(["\n\n"])
    assert feed_all(matcher, ["line\n"])[1] == "line\n" and not matcher.stopped


def test_no_stops_passes_text_through():
    matcher = StopStringMatcher([])
    assert feed_all(matcher, ["a", "b"]) == (["a", "b"], "ab")


def choice(tokenizer, stops):
    return Choice(0, IncrementalDetokenizer(tokenizer), StopStringMatcher(stops))


def test_choice_stop_string_over_token_boundaries(tokenizer):
    text = "the answer is 42 and then some"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    c = choice(tokenizer, ["42 and"])
    streamed = ""
    for i, token in enumerate(ids):
        delta = c.feed(TokenBatch("r", [token], None, prompt_tokens=5 if i == 0 else None))
        streamed += delta.text
        if c.finished:
            break
    assert streamed == c.text == "the answer is " and c.finish_reason == "stop"
    assert c.prompt_tokens == 5 and c.completion_tokens < len(ids)


def test_choice_engine_finish_flushes_held_text(tokenizer):
    ids = tokenizer("abc ST", add_special_tokens=False).input_ids
    c = choice(tokenizer, ["STOP"])
    for token in ids[:-1]:
        c.feed(TokenBatch("r", [token]))
    last = c.feed(TokenBatch("r", [ids[-1]], "length"))
    assert c.text == "abc ST" and last.finish_reason == "length" and c.completion_tokens == len(ids)


def test_logprobs_in_openai_shapes(tokenizer):
    ids = tokenizer("hé", add_special_tokens=False).input_ids  # 'h' then the two bytes of 'é'
    top_ids = np.array([[t, 7] for t in ids], dtype=np.int32)
    top_lps = np.array([[-0.1, -2.5]] * len(ids), dtype=np.float32)
    batch = TokenBatch("r", ids, "length", prompt_tokens=3, logprobs=[-0.1] * len(ids), top_ids=top_ids,
                       top_logprobs=top_lps)
    names = TokenText(tokenizer)

    chat = ChatFormat(names, "m", 1, True, "x")
    c = choice(tokenizer, [])
    chat.collect(0, c.feed(batch))
    entries = chat.full_choice(c)["logprobs"]["content"]
    assert [e["token"] for e in entries] == [tokenizer.decode([t]) for t in ids]
    assert b"".join(bytes(e["bytes"]) for e in entries) == "hé".encode()
    assert entries[0]["logprob"] == pytest.approx(-0.1)
    assert [a["logprob"] for a in entries[1]["top_logprobs"]] == pytest.approx([-0.1, -2.5])
    assert entries[1]["top_logprobs"][1]["token"] == tokenizer.decode([7])

    completion = CompletionFormat(names, "m", 1, True, "x")
    c = choice(tokenizer, [])
    chunk = completion.chunk_choice(0, c.feed(batch))
    lp = chunk["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids] and lp["token_logprobs"] == pytest.approx([-0.1] * len(ids))
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == 1
    assert set(lp["top_logprobs"][0]) == {tokenizer.decode([ids[0]]), tokenizer.decode([7])}


def test_no_logprobs_when_not_asked_or_not_sent(tokenizer):
    names = TokenText(tokenizer)
    c = choice(tokenizer, [])
    chat = ChatFormat(names, "m", 1, True, "x")
    delta = c.feed(TokenBatch("r", [40], "stop"))
    assert chat.chunk_choice(0, delta)["logprobs"] is None
