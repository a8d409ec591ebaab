"""Property-based fuzzing of the api's output parsers and detokenizer, and of the media
decoders (issue 10).

- reasoning / tool-call parsing (`ChatOutput`): any text, split any way, gives the result of the
  whole text at once, the streamed deltas add up to the full body, every call's arguments are
  JSON objects, and nothing raises;
- `IncrementalDetokenizer` on any token ids in any chunks gives the tokenizer's own decoding of
  the whole sequence; `StopStringMatcher` cuts at the first stop string whatever the split;
- `parse_data_uri`, and the image / audio / video decoders on valid media of every kind with
  bytes corrupted, raise only `MediaError`.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, strategies as st
from PIL import Image

from actors.media_inputs import MediaError, MediaLimits, MediaProcessor, parse_data_uri
from api.chat_output import ChatOutput, ChatOutputConfig
from api.detokenize import IncrementalDetokenizer, StopStringMatcher
from api.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN
from api.tool_parser import CALL_CLOSE, CALL_OPEN, QUOTE
from tests.fuzzing import fuzz_settings

CHECKPOINT = Path(__file__).resolve().parents[1] / "default_model" / "checkpoint"

# --- reasoning and tool calls ---------------------------------------------------------------------
_PIECES = [CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, CALL_CLOSE, QUOTE, "thought\n", "call:", "get_weather", "{", "}",
           "[", "]", ",", ":", "\n", " ", "1", "-2.5e3", "1e999", "true", "null", "x", "<", "|", '"', "\\", "é😀",
           "location:", "nan", "0x1F", "+3", "<|", "<tool_", "<channel"]
_texts = st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=4)), max_size=30).map("".join)
_configs = st.builds(ChatOutputConfig, thinking=st.booleans(), start_in_reasoning=st.booleans(),
                     parse_tools=st.booleans(), max_calls=st.sampled_from([None, 1, 2]))


def _splits(draw, text: str) -> list[str]:
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=8)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def _parse(config: ChatOutputConfig, chunks: list[str]) -> dict:
    """Feed the chunks; the streamed deltas put together, and the full body's view, must agree."""
    counter = itertools.count()
    out = ChatOutput(config, id_factory=lambda: f"call_{next(counter)}")
    streamed = {"reasoning": "", "content": "", "calls": []}
    for delta in [out.feed(c) for c in chunks] + [out.flush()]:
        streamed["reasoning"] += delta.reasoning
        streamed["content"] += delta.content
        for call in delta.tool_calls:
            if "id" in call:
                assert call["index"] == len(streamed["calls"])
                streamed["calls"].append([call["id"], call["function"]["name"], call["function"]["arguments"]])
            else:
                streamed["calls"][call["index"]][2] += call["function"]["arguments"]
    full = {"reasoning": out.reasoning_text or "", "content": out.content_text,
            "calls": [[c["id"], c["function"]["name"], c["function"]["arguments"]] for c in out.calls]}
    assert streamed == full
    for _, name, arguments in full["calls"]:
        assert name and isinstance(json.loads(arguments), dict)
    if config.max_calls is not None:
        assert len(full["calls"]) <= config.max_calls
    return full


@fuzz_settings(400)
@given(_configs, _texts, st.data())
def test_chat_output_is_split_independent(config, text, data):
    assert _parse(config, _splits(data.draw, text)) == _parse(config, [text])


def test_chat_output_every_split_of_a_full_answer():
    text = (f"{CHANNEL_OPEN}thought\nhm{CHANNEL_CLOSE}{CALL_OPEN}call:f{{a:{QUOTE}x{QUOTE},b:[1,{{c:null}}]}}"
            f"{CALL_CLOSE}")
    config = ChatOutputConfig(thinking=True, parse_tools=True)
    whole = _parse(config, [text])
    assert whole["reasoning"] == "hm" and whole["calls"] == [["call_0", "f", '{"a": "x", "b": [1, {"c": null}]}']]
    assert _parse(config, list(text)) == whole


# --- detokenizer and stop strings -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(CHECKPOINT)


@fuzz_settings(300)
@given(st.lists(st.one_of(st.integers(0, 1100), st.integers(-(2**70), 2**70)), max_size=24), st.data(),
       st.booleans())
def test_detokenizer_any_ids_any_chunks(tokenizer, ids, data, skip_special):
    cuts = sorted(data.draw(st.sets(st.integers(0, len(ids)), max_size=6)))
    chunks = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special)
    text = "".join(detok.add(c) for c in chunks) + detok.flush()
    known = [t for t in ids if 0 <= t < 2**32]  # ids past the tokenizer's range render as nothing, as unknown ones do
    assert text == tokenizer.decode(known, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


@fuzz_settings(300)
@example(["<", "a<<"], "a<<", None)  # overlapping stops: the one complete first wins, whatever the split
@given(st.lists(st.text(alphabet="ab\u00e9<", min_size=0, max_size=3), max_size=4),
       st.text(alphabet="ab\u00e9< ", max_size=30), st.data())
def test_stop_strings_any_split(stops, text, data):
    matcher = StopStringMatcher(stops)
    chunks = _splits(data.draw, text) if data is not None else list(text)
    out = "".join(matcher.feed(c) for c in chunks)
    ends = [i + len(s) for s in stops if s and (i := text.find(s)) >= 0]
    if ends:  # generation stops as soon as a stop string is complete: cut before the first one then
        first_end = min(ends)
        cut = min(text.find(s) for s in stops if s and 0 <= text.find(s) and text.find(s) + len(s) == first_end)
        assert matcher.stopped and out == text[:cut]
    else:
        assert not matcher.stopped and out + matcher.flush() == text


# --- media ----------------------------------------------------------------------------------------
@fuzz_settings(300)
@given(st.one_of(st.text(max_size=40), st.builds(lambda m, p: f"data:{m};base64,{p}",
                                                 st.text(max_size=12), st.text(alphabet="QUJD=+/\n a\u00e9", max_size=24))),
       st.integers(0, 20))
@example("data:;base64,QUJD", 2)
@example("DATA:image/png;BASE64,QUI=", 20)
def test_parse_data_uri(url, max_bytes):
    try:
        mime, data = parse_data_uri(url, max_bytes)
    except MediaError as exc:
        assert exc.param == "url" and exc.message
        return
    assert isinstance(mime, str) and 0 < len(data) <= max_bytes


@pytest.fixture(scope="module")
def processor():
    return MediaProcessor(CHECKPOINT, MediaLimits(max_image_pixels=1 << 20, max_audio_seconds=5.0,
                                                  max_video_seconds=5.0, max_video_frames=50))


def _image_bytes(width: int, height: int, mode: str, fmt: str) -> bytes:
    rng = np.random.default_rng(width * 131 + height)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


# Modes each format writes in this Pillow (checked when the module loads: no silent fallback).
_IMAGE_FORMATS = {"PNG": ["1", "L", "P", "RGB", "RGBA", "I;16", "LA"], "JPEG": ["L", "RGB", "CMYK"],
                  "GIF": ["L", "P"], "BMP": ["1", "L", "P", "RGB"], "TIFF": ["1", "L", "RGB", "RGBA", "CMYK", "I;16", "F"],
                  "WEBP": ["RGB", "RGBA"]}
_images = st.sampled_from(sorted(_IMAGE_FORMATS)).flatmap(
    lambda fmt: st.builds(_image_bytes, st.integers(1, 80), st.integers(1, 80), st.sampled_from(_IMAGE_FORMATS[fmt]),
                          st.just(fmt)))


def _corrupt(data: bytes, draw) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        if not out:
            break
        i = draw(st.integers(0, len(out) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            out[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del out[i:]
        else:
            out[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


def _processed_or_media_error(call):
    try:
        item = call()
    except MediaError as exc:
        assert exc.param and exc.message
        return None
    assert item.num_soft_tokens > 0 and item.placeholder_text
    return item


@fuzz_settings(150)
@given(_images, st.sampled_from([None, 70, 140, 280]), st.data())
def test_images_any_size_mode_format_corrupted(processor, data_bytes, budget, data):
    corrupted = _corrupt(data_bytes, data.draw)
    _processed_or_media_error(lambda: processor.image(corrupted, budget=budget))


def _audio_bytes(frames: int, rate: int, channels: int, fmt: str, subtype: str | None) -> bytes:
    import soundfile

    wave = np.sin(np.arange(frames * channels, dtype=np.float32).reshape(frames, channels) / 7.0) * 0.5
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


_audios = st.builds(_audio_bytes, st.integers(0, 4000), st.sampled_from([1, 8000, 11025, 16000, 44100, 96000]),
                    st.integers(1, 3), st.sampled_from(["WAV", "FLAC"]), st.sampled_from([None, "PCM_16"]))


@fuzz_settings(120)
@given(st.one_of(_audios, st.binary(max_size=64)), st.data())
@example(b"", None)
def test_audio_any_rate_channels_corrupted(processor, audio, data):
    corrupted = _corrupt(audio, data.draw) if data is not None else audio
    _processed_or_media_error(lambda: processor.audio(corrupted))


@pytest.fixture(scope="module")
def small_video() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.height, stream.width = 32, 48
        stream.pix_fmt = "yuv420p"
        for i in range(6):
            frame = np.full((32, 48, 3), i * 40, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@fuzz_settings(40)
@given(st.data())
def test_video_corrupted(processor, small_video, data):
    corrupted = _corrupt(small_video, data.draw)
    _processed_or_media_error(lambda: processor.video(corrupted, budget=70))


# --- the preprocess actor's whole path (chat template, media, tokenizer) ---------------------------
def _data_url(mime: str, data: bytes) -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def multimodal_preprocessor(tokenizer):
    from actors.media_prompt import FetchPolicy, MediaPrompt, Placeholders
    from actors.preprocess import Preprocessor
    from gemma4_model.config import load_config

    media = MediaPrompt(MediaProcessor(CHECKPOINT, MediaLimits(max_images=2, max_audios=1, max_videos=1)),
                        FetchPolicy(()), Placeholders.from_tokenizer(tokenizer, load_config(CHECKPOINT).special_tokens))
    return Preprocessor(tokenizer, [1], media)


_MEDIA_URLS = [_data_url("image/png", _image_bytes(20, 12, "RGB", "PNG")),
               _data_url("image/gif", _image_bytes(9, 30, "P", "GIF")),
               _data_url("audio/wav", _audio_bytes(3000, 16000, 1, "WAV", None)), "data:image/png;base64,AAAA",
               "data:,x", "https://media.example.com/a.png", "http://[::1", "ftp://x"]
_any = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)
_media_part = st.one_of(
    st.builds(lambda kind, url: {"type": kind, kind: {"url": url}},
              st.sampled_from(["image_url", "audio_url", "video_url"]), st.one_of(st.sampled_from(_MEDIA_URLS), _any)),
    st.builds(lambda data, fmt: {"type": "input_audio", "input_audio": {"data": data, "format": fmt}},
              st.one_of(st.just(_MEDIA_URLS[2].split(",", 1)[1]), _any), st.one_of(st.sampled_from(["wav", "mp3"]), _any)),
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["text", "image", "image_url"]), _any),
                           "text": _any}), _any)
# Shapes the api's schema lets through: a known role, content text / a list of objects / none,
# any other message fields; tools a list of objects; kwargs objects; a checked vision budget.
_pre_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
                                     optional={"content": st.one_of(st.text(max_size=10), st.none(), st.lists(
                                         st.one_of(_media_part.filter(lambda p: isinstance(p, dict)),
                                                   st.dictionaries(st.text(max_size=6), _any, max_size=3)), max_size=3)),
                                               "tool_calls": st.one_of(st.lists(st.fixed_dictionaries({
                                                   "function": st.fixed_dictionaries({
                                                       "name": st.one_of(st.just("f"), _any),
                                                       "arguments": st.one_of(st.just('{"a": 1}'), st.just("[]"), _any)})}),
                                                   max_size=2), _any)})


@fuzz_settings(150)
@given(st.fixed_dictionaries({"messages": st.lists(_pre_message, min_size=1, max_size=3)}, optional={
    "tools": st.one_of(st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
                       st.lists(st.dictionaries(st.text(max_size=6), _any, max_size=3), max_size=2)),
    "chat_template_kwargs": st.one_of(st.fixed_dictionaries({"enable_thinking": _any}),
                                      st.dictionaries(st.text(max_size=6), _any, max_size=3)),
    "mm_processor_kwargs": st.fixed_dictionaries({"max_soft_tokens": st.sampled_from([70, 140, 280])})}),
       st.sampled_from([None, "required", "function:f", "function:g"]))
def test_preprocess_any_chat_gives_a_job_or_a_value_error(multimodal_preprocessor, chat, tool_choice):
    """The preprocess actor answers a ValueError (MediaError included) with a 400 and goes on;
    any other exception would end its loop."""
    from actors.messages import GenerateRequest, SamplingSpec

    request = GenerateRequest("r", json.dumps(chat), SamplingSpec(tool_choice=tool_choice))
    try:
        prepared = multimodal_preprocessor.prepare(request)
    except ValueError as exc:
        assert str(exc)
        return
    assert len(prepared.job.token_ids) > 0
