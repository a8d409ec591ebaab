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


def media_prompt(tokenizer, **limits) -> MediaPrompt:
    processor = MediaProcessor(CHECKPOINT, MediaLimits(**limits))
    return MediaPrompt(processor, FetchPolicy(("media.example.com",)),
                       Placeholders.from_tokenizer(tokenizer, load_config(CHECKPOINT).special_tokens))


def image_part(colour=(200, 30, 30), side=48) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}


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
