"""Multimodal chat prompts in preprocess: media parts loaded and counted, placeholders expanded
as the Gemma 4 processor writes them, and each item's placeholder runs located in the ids."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from actors.media_inputs import MediaError, MediaLimits, MediaProcessor
from actors.media_prompt import FetchPolicy, MediaPrompt, Placeholders
from actors.messages import GenerateRequest, SamplingSpec
from actors.preprocess import Preprocessor, encode_job
from default_model import CHECKPOINT
from gemma4_model.config import load_config


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


def media_prompt(tokenizer, workers=None, **limits) -> MediaPrompt:
    processor = MediaProcessor(CHECKPOINT, MediaLimits(**limits))
    return MediaPrompt(processor, FetchPolicy(("media.example.com",)),
                       Placeholders.from_tokenizer(tokenizer, load_config(CHECKPOINT).special_tokens), workers=workers)


def image_part(colour=(200, 30, 30), side=48, height=None, noise=False) -> dict:
    """A plain-colour PNG, or with `noise` a JPEG of random pixels (as the benchmark's images)."""
    width, height = side, height or side
    if noise:
        image = Image.fromarray(np.random.default_rng(side).integers(0, 256, (height, width, 3), dtype=np.uint8))
    else:
        image = Image.new("RGB", (width, height), colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if noise else "PNG")
    url = f"data:image/{'jpeg' if noise else 'png'};base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def part_bytes(part: dict) -> bytes:
    return base64.b64decode(part["image_url"]["url"].partition(",")[2])


def audio_part(seconds=1.0) -> dict:
    import wave

    t = np.arange(int(16000 * seconds)) / 16000
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes())
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode(), "format": "wav"}}


def request(content, **extra) -> GenerateRequest:
    body = {"messages": [{"role": "user", "content": content}], **extra}
    return GenerateRequest("r", json.dumps(body), SamplingSpec())


def test_two_images_and_audio_become_runs_their_items_fill(tokenizer):
    pre = Preprocessor(tokenizer, [1], media_prompt(tokenizer))
    prepared = pre.prepare(request([image_part(), {"type": "text", "text": "and"}, image_part((30, 60, 220), 96),
                                    audio_part(), {"type": "text", "text": "What is it?"}]))
    job, items = prepared.job, prepared.media
    assert job.media_kinds == ["image", "image", "audio"] and [m.kind for m in items] == job.media_kinds
    assert job.media_keys[0] != job.media_keys[1]  # other content, other key
    ids = job.token_ids.tolist()
    special = load_config(CHECKPOINT).special_tokens
    for (item, start, length), media in zip(job.media_spans.tolist(), items):
        placeholder = special[f"{media.kind}_token_id"]
        assert length == media.num_soft_tokens and ids[start:start + length] == [placeholder] * length
        assert ids[start - 1] == special["boi_token_id" if media.kind == "image" else "boa_token_id"]
    assert sum(t in (special["image_token_id"], special["audio_token_id"]) for t in ids) == \
        sum(m.num_soft_tokens for m in items)
    jobs = [encode_job("r", i, m, reply_to=0) for i, m in enumerate(items)]
    assert jobs[0].pixel_values.ndim == 3 and jobs[0].pixel_values.shape[0] == 1  # an image is one frame
    assert jobs[2].features is not None and jobs[2].feature_mask.dtype == bool


def test_the_request_budget_wins_over_the_default(tokenizer):
    pre = Preprocessor(tokenizer, [1], media_prompt(tokenizer))
    small = pre.prepare(request([image_part(side=400)])).media[0]
    large = pre.prepare(request([image_part(side=400)], mm_processor_kwargs={"max_soft_tokens": 280})).media[0]
    assert small.num_soft_tokens <= 70 < large.num_soft_tokens <= 280
    assert small.content_hash != large.content_hash


def test_refusals_name_the_part(tokenizer):
    pre = Preprocessor(tokenizer, [1], media_prompt(tokenizer, max_images=1))
    with pytest.raises(MediaError) as err:
        pre.prepare(request([image_part(), image_part()]))
    assert err.value.param == "messages.0.content.1" and "at most 1" in err.value.message
    with pytest.raises(MediaError) as err:
        pre.prepare(request([{"type": "image_url", "image_url": {"url": "https://elsewhere.example.org/a.png"}}]))
    assert err.value.param == "messages.0.content.0" and "not allowed" in err.value.message
    with pytest.raises(MediaError, match="placeholder tokens without media"):
        pre.prepare(request([image_part(), {"type": "text", "text": "and <|image|> here"}]))
    with pytest.raises(ValueError, match="without media support"):
        Preprocessor(tokenizer, [1]).prepare(request([image_part()]))


def test_items_processed_side_by_side_are_those_of_one_by_one(tokenizer):
    """A pool of 4 against a pool of 1 and against the processor called item by item: the same
    pixels, positions, keys, prompt ids and spans, in prompt order (the big first image ends last)."""
    content = [image_part(side=1280, height=720, noise=True), {"type": "text", "text": "then"}, image_part(),
               audio_part(), image_part((30, 60, 220), 300, noise=True), {"type": "text", "text": "Which differ?"}]
    body = request(content, mm_processor_kwargs={"max_soft_tokens": 280})
    side_by_side = Preprocessor(tokenizer, [1], media_prompt(tokenizer, workers=4))
    one_by_one = Preprocessor(tokenizer, [1], media_prompt(tokenizer, workers=1))
    got, want = side_by_side.prepare(body), one_by_one.prepare(body)
    processor = side_by_side.media.processor
    serial = [processor.image(part_bytes(content[0]), 280), processor.image(part_bytes(content[2]), 280),
              processor.audio(base64.b64decode(content[3]["input_audio"]["data"])),
              processor.image(part_bytes(content[4]), 280)]
    np.testing.assert_array_equal(got.job.token_ids, want.job.token_ids)
    np.testing.assert_array_equal(got.job.media_spans, want.job.media_spans)
    assert got.job.media_kinds == want.job.media_kinds == ["image", "image", "audio", "image"]
    assert got.job.media_keys == want.job.media_keys == [m.content_hash for m in serial]
    for a, b, c in zip(got.media, want.media, serial):
        assert a.content_hash == b.content_hash == c.content_hash and a.placeholder_text == c.placeholder_text
        for name in c.arrays:
            np.testing.assert_array_equal(a.arrays[name], c.arrays[name])
            np.testing.assert_array_equal(b.arrays[name], c.arrays[name])
    side_by_side.close(), one_by_one.close()


def test_a_failing_item_is_the_error_once_the_others_stopped(tokenizer, monkeypatch):
    """The first failing item in prompt order is the error, with its own message and part, as
    item by item; it is raised only after the request's other items stopped: none runs on."""
    import threading
    import time

    media = media_prompt(tokenizer, workers=4)
    pre = Preprocessor(tokenizer, [1], media)
    png = part_bytes(image_part())

    def cut(n: int) -> dict:  # the first n bytes of a PNG
        url = "data:image/png;base64," + base64.b64encode(png[:n]).decode()
        return {"type": "image_url", "image_url": {"url": url}}

    with pytest.raises(MediaError) as alone:
        media.processor.image(png[:len(png) // 2])
    running, finished, slow, lock = set(), set(), set(), threading.Lock()
    process = media._process

    def slowed(kind, data, budget, param):
        with lock:
            running.add(param)
        try:
            if param in slow:
                time.sleep(0.3)
            return process(kind, data, budget, param)
        finally:
            with lock:
                finished.add(param)

    monkeypatch.setattr(media, "_process", slowed)
    slow.add("messages.0.content.1")  # a good image still being processed when the broken one fails
    with pytest.raises(MediaError) as err:
        pre.prepare(request([cut(len(png) // 2), image_part(side=400), image_part((0, 0, 255)),
                             image_part((0, 255, 0))]))
    assert err.value.param == "messages.0.content.0" and err.value.message == alone.value.message
    assert "truncated" in err.value.message
    assert running == finished and "messages.0.content.1" in finished  # nothing of the request still runs
    time.sleep(0.1)
    assert running == finished  # and nothing cancelled starts later
    # Two broken items: the error is the first one's, though the second fails first.
    slow.clear(), slow.add("messages.0.content.0")
    with pytest.raises(MediaError) as err:
        pre.prepare(request([cut(len(png) // 3), cut(8)]))
    assert err.value.param == "messages.0.content.0" and "truncated" in err.value.message
    # Counting still refuses before decoding anything: no item ran.
    running.clear(), finished.clear()
    with pytest.raises(MediaError, match="9 image items in one prompt; at most 8 allowed"):
        pre.prepare(request([image_part()] * 9))
    assert not running
    assert len(pre.prepare(request([image_part()] * 2)).media) == 2  # the pool serves the next request
    pre.close()


def test_the_actor_closes_its_media_pool_when_it_stops(tokenizer):
    import threading

    import zmq

    from actors.preprocess import PreprocessActor
    from actors.transport import pull, push

    media = media_prompt(tokenizer)
    ctx = zmq.Context()
    channels = [pull(ctx, "inproc://media-pre-in"), push(ctx, "inproc://media-pre-down", bind=True),
                push(ctx, "inproc://media-pre-err", bind=True)]
    stop = threading.Event()
    stop.set()
    PreprocessActor(Preprocessor(tokenizer, [1], media), *channels).run(stop)
    with pytest.raises(RuntimeError, match="shutdown"):
        media.pool.submit(print)
    for ch in channels:
        ch.close()
    ctx.term()
