"""Images and audio through `tandem serve` with the embedded default model (issue 6, acceptance 2
and 4): the held-out colour, tone and beep tasks answered right through the `openai` client, a
request mixing text, two images and audio, the same answers over the disaggregated topology,
and every kind of bad media refused with a 400 that says what was wrong, the server serving on."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from default_model.tasks import SAMPLE_RATE, make_set
from tests.serving import Served

MEDIA_KINDS = ("colour", "tone", "beeps")


def png_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def openai_messages(inst) -> list[dict]:
    """The task's messages with its image / audio as OpenAI content parts."""
    out = []
    for message in inst.messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image":
                    parts.append({"type": "image_url", "image_url": {"url": png_uri(inst.image)}})
                elif part["type"] == "audio":
                    data = base64.b64encode(wav_bytes(inst.audio)).decode()
                    parts.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
                else:
                    parts.append(part)
            content = parts
        out.append({**message, "content": content})
    return out


@pytest.fixture(scope="module")
def instances():
    return make_set(7, 4 * len(MEDIA_KINDS), heldout=True, kinds=MEDIA_KINDS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    with Served(["serve", "--topology", "cpu_colocated", "--max-media-bytes", str(256 << 10),
                 "--trace-dir", str(root / "traces")], log=root / "tandem.log") as s:
        s.trace_dir = root / "traces"
        yield s


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def answer(url: str, messages: list[dict], **extra) -> str:
    reply = client(url).chat.completions.create(model="tandem-default", messages=messages, max_tokens=16,
                                                temperature=0, **extra)
    return reply.choices[0].message.content


def test_image_and_audio_tasks_are_answered_right(served, instances):
    wrong = [(inst.kind, inst.answer, got) for inst in instances
             if (got := answer(served.url, openai_messages(inst))) != inst.answer]
    assert not wrong, wrong


def test_one_request_mixes_text_two_images_and_audio(served, instances):
    colour = next(i for i in instances if i.kind == "colour")
    other = next(i for i in instances if i.kind == "colour" and i.answer != colour.answer)
    tone = next(i for i in instances if i.kind == "tone")
    parts = (openai_messages(colour)[0]["content"][:1] + openai_messages(other)[0]["content"][:1]
             + openai_messages(tone)[0]["content"][:1])
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "What is the main colour of this image?"}]}]
    reply = client(served.url).chat.completions.create(model="tandem-default", messages=messages, max_tokens=16,
                                                       temperature=0)
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content
    text_only = client(served.url).chat.completions.create(
        model="tandem-default", messages=[{"role": "user", "content": "What is the main colour of this image?"}],
        max_tokens=1)
    # two images of 70 soft tokens (+ begin/end markers) and one clip's soft tokens joined the prompt
    assert reply.usage.prompt_tokens > text_only.usage.prompt_tokens + 2 * 72
    # and the single-image answer is unchanged by what came before in other requests
    assert answer(served.url, openai_messages(colour)) == colour.answer


def video_uri(frames: int, colour: tuple[int, int, int], fps: int = 8) -> str:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), colour, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_video_frames_reach_the_model_and_repeats_hit_the_encoder_cache(served, instances):
    import time

    from actors.media_inputs import MediaLimits, MediaProcessor
    from actors.tracing import read_spans
    from default_model import CHECKPOINT

    uri = video_uri(12, (200, 30, 30))
    expected = MediaProcessor(CHECKPOINT, MediaLimits()).video(base64.b64decode(uri.split(",", 1)[1]))
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}},
                                             {"type": "text", "text": "What is the main colour of this image?"}]}]
    text_only = [{"role": "user", "content": "What is the main colour of this image?"}]
    lengths = []
    for body in (messages, messages, text_only):
        reply = client(served.url).chat.completions.create(model="tandem-default", messages=body, max_tokens=4)
        assert reply.choices[0].message.content is not None
        lengths.append(reply.usage.prompt_tokens)
    assert len(expected.frame_indices) == 12
    assert lengths[0] == lengths[1] >= lengths[2] + expected.num_soft_tokens  # every frame's soft tokens
    deadline = time.monotonic() + 15  # actors flush their spans about once a second
    while True:
        spans = [s for s in read_spans(served.trace_dir) if s.stage == "encode" and s.attrs["kind"] == "video"]
        if len(spans) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [s.attrs["cached"] for s in spans] == [False, True], spans  # the repeat was not encoded again
    assert spans[0].attrs["tokens"] == expected.num_soft_tokens and spans[0].end_ns > spans[0].start_ns


def bad_image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is the main colour of this image?"}]}]


def huge_png_header(side: int = 20000) -> bytes:
    """A PNG that declares side x side pixels but holds almost nothing (never decoded in full)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_bad_media_get_a_clear_400_and_the_server_keeps_serving(served, instances):
    good = png_uri(next(i for i in instances if i.kind == "colour").image)
    raw = base64.b64decode(good.split(",", 1)[1])
    cases = {
        "truncated": ("data:image/png;base64," + base64.b64encode(raw[: len(raw) // 2]).decode(), "truncated"),
        "not an image": ("data:image/png;base64," + base64.b64encode(b"hello, this is text" * 20).decode(),
                         "not an image"),
        "20000x20000": ("data:image/png;base64," + base64.b64encode(huge_png_header()).decode(), "20000x20000"),
        "oversize": ("data:image/png;base64," + base64.b64encode(b"\0" * (300 << 10)).decode(), "exceeds"),
    }
    for name, (url, words) in cases.items():
        with pytest.raises(openai.BadRequestError) as err:
            answer(served.url, bad_image_message(url))
        assert err.value.status_code == 400, name
        message = err.value.body["message"] if isinstance(err.value.body, dict) else str(err.value)
        assert words in message.lower(), (name, message)
        assert err.value.body.get("param") == "messages.0.content.0", (name, err.value.body)
    noise = base64.b64encode(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4).decode()
    with pytest.raises(openai.BadRequestError) as err:
        answer(served.url, [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": noise, "format": "wav"}},
            {"type": "text", "text": "Is the tone high or low?"}]}])
    assert "audio" in err.value.body["message"].lower() and "decode" in err.value.body["message"].lower()
    with pytest.raises(openai.BadRequestError) as err:
        answer(served.url, bad_image_message(good), extra_body={"mm_processor_kwargs": {"max_soft_tokens": 99}})
    assert "max_soft_tokens" in err.value.body["message"]
    inst = next(i for i in instances if i.kind == "tone")
    assert answer(served.url, openai_messages(inst)) == inst.answer  # still serving
