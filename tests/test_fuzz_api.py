"""Property-based fuzzing of the HTTP API (issue 10): the app as `create_app` builds it, over the
real `ZmqBackend` and the real preprocess actor (chat template, tokenizer) on in-process ZeroMQ
sockets, with a fake engine that answers each `PrefillJob` at once with a few token batches
(marker tokens included, so the reasoning and tool-call parsers run) or refuses what the real
engine's `sampling_params` refuses. Requests go in-process through httpx's ASGI transport.

For any JSON body (arbitrary, or shaped like the OpenAI schema with wrong types, out-of-range
and huge numbers, unicode, nested content parts, tools, response_format, logprobs, n, stop
lists, stream on or off), raw bytes, content types, headers, methods and paths: no 5xx, no
crashed actor, no hang (every request has a deadline), every 4xx a JSON error object with a
message, every stream well-formed SSE without a server-error event, and no request left in
flight afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import traceback
import wave
import zlib
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import zmq
from hypothesis import event, example, given, strategies as st
from PIL import Image

from actors.engine_actor import sampling_params
from actors.media_inputs import MediaLimits, MediaProcessor
from actors.media_prompt import FetchPolicy, MediaPrompt, Placeholders
from actors.messages import CancelRequest, PrefillJob, RequestError, TokenBatch
from actors.preprocess import Preprocessor, PreprocessActor
from actors.transport import pull, push
from api.app import create_app
from api.backend import ZmqBackend
from default_model import CHECKPOINT
from gemma4_model.config import load_config
from tests.fuzzing import fuzz_settings

MODEL = "tandem-default"
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REQUEST_DEADLINE_S = 10.0  # a request still unanswered after this is a hang
ROUTES = ("/v1/chat/completions", "/v1/completions")
VOCAB = 1024  # the default model's tokenizer; a padded model vocabulary may sample ids past it


# --- the pipeline -------------------------------------------------------------------------------
class FakeEngine:
    """Answers every `PrefillJob` at once: the real engine's parameter check, then 1..6 tokens
    (text and the format markers) in one to three batches, with logprobs when asked."""

    def __init__(self, inbox, outbox, marker_ids: list[int]):
        self.inbox, self.outbox = inbox, outbox
        self.marker_ids = marker_ids

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            msg = self.inbox.recv(timeout_ms=20)
            if msg is None or isinstance(msg, CancelRequest):
                continue
            assert isinstance(msg, PrefillJob), type(msg).__name__
            self.answer(msg)

    def answer(self, job: PrefillJob) -> None:
        try:
            params = sampling_params(job.sampling)
        except ValueError as exc:  # what the engine actor answers with a 400
            self.outbox.send(RequestError(job.request_id, 400, str(exc)))
            return
        rng = np.random.default_rng(zlib.crc32(job.token_ids.tobytes()))  # same prompt, same tokens
        count = int(min(params.max_tokens, rng.integers(1, 7)))
        pool = np.concatenate([rng.integers(0, VOCAB + 64, 8), self.marker_ids])  # ids past the tokenizer too
        tokens = [int(t) for t in rng.choice(pool, count)]
        cuts = sorted({int(c) for c in rng.integers(1, count + 1, 2)} | {count})
        start = 0
        for end in cuts:
            part = tokens[start:end]
            extra = {"prompt_tokens": len(job.token_ids), "cached_tokens": 0} if start == 0 else {}
            if params.logprobs is not None:
                k = params.logprobs
                extra.update(logprobs=[-0.5] * len(part), top_ids=rng.integers(0, VOCAB + 64, (len(part), k)).astype(np.int32),
                             top_logprobs=np.full((len(part), k), -1.0, np.float32))
            finish = None if end < count else ("length" if count == params.max_tokens else "stop")
            self.outbox.send(TokenBatch(job.request_id, part, finish, **extra))
            start = end


class Sink:
    """An encoder stand-in: takes `EncodeJob`s and drops them."""

    def __init__(self, inbox):
        self.inbox = inbox

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.inbox.recv(timeout_ms=20)


@dataclass
class Pipeline:
    app: object
    backend: ZmqBackend
    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    crashes: list[str] = field(default_factory=list)

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        async def go():
            return await asyncio.wait_for(self.client.request(method, path, **kw), REQUEST_DEADLINE_S)

        try:
            return self.loop.run_until_complete(go())
        except asyncio.TimeoutError:
            raise AssertionError(f"{method} {path} hung for {REQUEST_DEADLINE_S} s; actor crashes: {self.crashes}")


def _supervised(name: str, actor, stop: threading.Event, crashes: list[str], backend: ZmqBackend):
    """Run an actor; a crash is recorded and, as the launcher would, fails what is in flight."""
    def loop():
        while not stop.is_set():
            try:
                actor.run(stop)
            except Exception:
                crashes.append(f"{name}: {traceback.format_exc()}")
                backend.fail_all(503, f"{name} died")
    return threading.Thread(target=loop, name=f"fuzz-{name}", daemon=True)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    generation = json.loads((CHECKPOINT / "generation_config.json").read_text())
    stops = [generation["eos_token_id"]] if isinstance(generation["eos_token_id"], int) else generation["eos_token_id"]
    markers = tokenizer.convert_tokens_to_ids(["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", '<|"|>',
                                               "<turn|>", "<eos>"])
    markers += tokenizer("thought\ncall:get_weather{location:", add_special_tokens=False).input_ids
    run = tmp_path_factory.mktemp("fuzz-api")
    ends = {name: f"ipc://{run}/{name}" for name in ("preprocess", "engine", "results", "vision", "audio")}
    zctx = zmq.Context()
    backend = ZmqBackend([ends["preprocess"]], ends["results"], [ends["engine"]], context=zctx)
    backend.start()
    # Media are decoded and processed for real; the encoders are sinks (the fake engine does not wait for them).
    media = MediaPrompt(MediaProcessor(CHECKPOINT, MediaLimits(max_images=2, max_audios=1, max_videos=1)),
                        FetchPolicy(()), Placeholders.from_tokenizer(tokenizer, load_config(CHECKPOINT).special_tokens))
    sinks = {kind: pull(zctx, ends[kind], drop_malformed=True) for kind in ("vision", "audio")}
    preprocess = PreprocessActor(Preprocessor(tokenizer, stops, media), pull(zctx, ends["preprocess"]),
                                 push(zctx, ends["engine"]), push(zctx, ends["results"]),
                                 encoders={"vision_encoder": [push(zctx, ends["vision"])],
                                           "audio_encoder": [push(zctx, ends["audio"])]})
    engine = FakeEngine(pull(zctx, ends["engine"]), push(zctx, ends["results"]), markers)
    stop, crashes = threading.Event(), []
    threads = [_supervised(n, a, stop, crashes, backend) for n, a in (("preprocess", preprocess), ("engine", engine),
                                                                      *((k, Sink(c)) for k, c in sinks.items()))]
    for t in threads:
        t.start()
    app = create_app(backend, tokenizer, MODEL, api_key=KEY, max_body_bytes=64 << 10, default_max_tokens=8,
                     allowed_media_hosts=("media.example.com",), media_kinds=frozenset({"image", "audio", "video"}))
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem.test")
    try:
        yield Pipeline(app, backend, loop, client, crashes)
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        stop.set()
        for t in threads:
            t.join(timeout=5)
        backend.close()
        for ch in (preprocess.inbox, *preprocess.downstream, preprocess.errors, engine.inbox, engine.outbox,
                   *sinks.values(), *(c for chans in preprocess.encoders.values() for c in chans)):
            ch.close()
        zctx.term()


# --- the checks ---------------------------------------------------------------------------------
def check_reply(p: Pipeline, reply: httpx.Response, allow_503: bool = False) -> None:
    crashes, p.crashes[:] = list(p.crashes), []  # each example reports its own
    assert not crashes, crashes[0]
    status = reply.status_code
    event(f"status {status}")  # `pytest --hypothesis-show-statistics` shows how often each is reached
    assert status < 500 or (allow_503 and status == 503), (status, reply.text[:500])
    if reply.request.method == "HEAD":
        assert not reply.content  # a HEAD reply has a status and headers only
    elif status >= 400:
        body = reply.json()
        assert isinstance(body, dict) and set(body) == {"error"}, reply.text[:300]
        error = body["error"]
        assert set(error) >= {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"].strip(), error
        assert error["type"] not in ("server_error", "service_unavailable") or allow_503, error
    elif reply.headers.get("content-type", "").startswith("text/event-stream"):
        events = [e for e in reply.text.split("\n\n") if e]
        assert events and all(e.startswith("data: ") for e in events), reply.text[:300]
        assert events[-1] in ("data: [DONE]",) or '"error"' in events[-1], events[-1][:300]
        for e in events:
            if e != "data: [DONE]":
                payload = json.loads(e[len("data: "):])
                if "error" in payload:
                    assert payload["error"]["type"] not in ("server_error", "service_unavailable"), payload
    elif reply.request.url.path in ROUTES:
        body = reply.json()
        assert body["choices"] and "usage" in body, body


def check_idle(p: Pipeline, before: int) -> None:
    """Every request the example made has ended: none of them left in the backend's table."""
    assert p.backend.in_flight == before, (p.backend.in_flight, before)


# --- strategies ---------------------------------------------------------------------------------
_huge = st.sampled_from([2**63, 2**64, 10**30, -(10**30), 1e308, -1e308, float("inf"), float("nan"), 1e-320])
_numbers = st.one_of(st.integers(-3, 40), st.floats(-3, 3, allow_nan=False), _huge)
_text = st.one_of(st.text(max_size=12), st.sampled_from(["", "\u0000", "\ud7ff\uffff", "😀" * 3, "<|channel>",
                                                           "<|tool_call>", "<|image|>", "<turn|>", "{{ x }}",
                                                           "{% for %}", "\\u0000"]))
_json = st.recursive(st.one_of(st.none(), st.booleans(), _numbers, _text),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=8)
def _media_url(fmt: str, mime: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buf, fmt)
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _wav_base64() -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(4000) / 5.0) * 8000).astype("<i2").tobytes())
    return base64.b64encode(buf.getvalue()).decode()


WAV = _wav_base64()
_url = st.one_of(st.sampled_from([_media_url("PNG", "image/png"), _media_url("GIF", "image/gif"),
                                  _media_url("BMP", "image/bmp"), f"data:audio/wav;base64,{WAV}",
                                  "https://media.example.com/a.png", "data:image/png;base64,iVBORw0KGgo=", "https://example.com/a.png", "http://[::1",
                                  "http://[zz]/", "ftp://x/y", "file:///etc/passwd", "data:", "https://", "//x",
                                  "http://a:b/", "https://media.example.com:99999/x"]), _text, _json)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(_text, _json)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "audio_url", "video_url"]),
                           "image_url": st.one_of(st.fixed_dictionaries({"url": _url}), _url),
                           "audio_url": st.fixed_dictionaries({"url": _url}),
                           "video_url": st.fixed_dictionaries({"url": _url})}),
    st.fixed_dictionaries({"type": st.just("input_audio"),
                           "input_audio": st.fixed_dictionaries({"data": st.one_of(st.just(WAV), _text),
                                                                 "format": st.one_of(st.just("wav"), _text)})}),
    st.fixed_dictionaries({"type": st.one_of(_json, st.sampled_from(["image", "audio", "video", "refusal"]))}),
    _json)
_tool_call = st.fixed_dictionaries({"id": _text, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.one_of(st.just("get_weather"), _text),
     "arguments": st.one_of(st.just('{"location": "Paris"}'), st.just("[1]"), st.just("{bad"), _text, _json)})})
_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), _json)},
    optional={"content": st.one_of(_text, st.lists(_part, max_size=3), st.none(), _json),
              "tool_calls": st.one_of(st.lists(_tool_call, max_size=2), _json),
              "tool_call_id": _text, "name": _text, "reasoning_content": _text})
_tool = st.one_of(
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.one_of(st.just("get_weather"), _text)},
        optional={"description": _text, "parameters": st.one_of(st.just({"type": "object", "properties": {
            "location": {"type": "string"}}, "required": ["location"]}), _json)})}),
    _json)
_schema = st.one_of(st.just({"type": "object", "properties": {"a": {"type": "integer"}}}), _json)
_response_format = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "yaml"])},
                          optional={"json_schema": st.one_of(st.fixed_dictionaries(
                              {"name": st.one_of(st.just("r"), _text), "schema": _schema}), _json)}),
    _json)
_common = {
    "max_tokens": st.one_of(st.integers(1, 8), _numbers, _json), "temperature": st.one_of(_numbers, _json),
    "top_p": _numbers, "top_k": _numbers, "min_p": _numbers, "seed": st.one_of(_numbers, st.integers(0, 2**63 - 1)),
    "stop": st.one_of(_text, st.lists(_text, max_size=5), _json), "n": st.one_of(st.integers(1, 3), _numbers),
    "presence_penalty": _numbers, "frequency_penalty": _numbers, "repetition_penalty": _numbers,
    "stream": st.one_of(st.booleans(), _json), "stream_options": st.one_of(
        st.fixed_dictionaries({"include_usage": st.booleans()}), _json),
    "ignore_eos": st.booleans(), "min_tokens": _numbers, "return_token_ids": st.booleans(),
    "response_format": _response_format, "user": _text, "logit_bias": _json,
}
_model = st.one_of(st.just(MODEL), st.just(MODEL), _json)
_chat = st.fixed_dictionaries({"model": _model, "messages": st.one_of(st.lists(_message, min_size=1, max_size=3),
                                                                       _json)}, optional={
    **_common, "max_completion_tokens": st.one_of(st.integers(1, 8), _numbers), "logprobs": st.one_of(st.booleans(), _json),
    "top_logprobs": st.one_of(st.integers(0, 5), _numbers), "tools": st.one_of(st.lists(_tool, max_size=2), _json),
    "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required"]), st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.one_of(st.just("get_weather"),
                                                                                             _text)})}), _json),
    "parallel_tool_calls": st.one_of(st.booleans(), _json),
    "chat_template_kwargs": st.one_of(st.fixed_dictionaries({}, optional={
        "enable_thinking": st.one_of(st.booleans(), _json), "add_generation_prompt": _json, "tools": _json,
        "messages": _json}), _json),
    "mm_processor_kwargs": st.one_of(st.fixed_dictionaries({"max_soft_tokens": st.one_of(
        st.sampled_from([70, 140, 280]), _numbers)}), _json),
})
_token_ids = st.lists(st.one_of(st.integers(0, 1023), _numbers), min_size=0, max_size=6)
_completion = st.fixed_dictionaries({"model": _model, "prompt": st.one_of(
    _text, st.lists(_text, max_size=3), _token_ids, st.lists(_token_ids, max_size=2), _json)}, optional={
    **_common, "logprobs": st.one_of(st.integers(0, 5), _numbers, _json), "echo": st.booleans(), "suffix": _text})


# Valid bodies (every field in range), to reach generation, streaming, n, logprobs and the
# output parsers; and valid bodies with exactly one field replaced by any JSON value.
_floats = lambda lo, hi: st.floats(lo, hi, allow_nan=False)  # noqa: E731
_valid_common = {
    "max_tokens": st.integers(1, 8), "temperature": _floats(0, 2), "top_p": _floats(0.01, 1),
    "top_k": st.integers(-1, 50), "min_p": _floats(0, 1), "seed": st.integers(0, 2**63 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
    "n": st.integers(1, 3), "presence_penalty": _floats(-2, 2), "frequency_penalty": _floats(-2, 2),
    "repetition_penalty": _floats(0.1, 3), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 2), "return_token_ids": st.booleans(),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]),
}
_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
    "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
_valid_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                           "content": st.one_of(_text, st.lists(st.fixed_dictionaries(
                               {"type": st.just("text"), "text": _text}), min_size=1, max_size=2))}),
    st.just({"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"location": "Paris"}'}}]}),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": st.just("c1"), "content": _text}),
    st.builds(lambda parts: {"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]},
              st.lists(st.sampled_from([{"type": "image_url", "image_url": {"url": _media_url("PNG", "image/png")}},
                                        {"type": "image_url", "image_url": {"url": _media_url("GIF", "image/gif")}},
                                        {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}}]),
                       max_size=2)))
_valid_chat = st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(_valid_message, min_size=1,
                                                                                    max_size=3)}, optional={
    **_valid_common, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
    "tools": st.just([_WEATHER]), "tool_choice": st.sampled_from(["none", "auto", "required", {
        "type": "function", "function": {"name": "get_weather"}}]), "parallel_tool_calls": st.booleans(),
    "chat_template_kwargs": st.fixed_dictionaries({"enable_thinking": st.booleans()}),
    "max_completion_tokens": st.integers(1, 8)})
_valid_completion = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": st.one_of(
    st.text(min_size=1, max_size=20), st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=2),
    st.lists(st.integers(0, 1023), min_size=1, max_size=6))}, optional={**_valid_common, "logprobs": st.integers(0, 5)})


def _one_field_wrong(bodies, fields):
    return st.tuples(bodies, st.sampled_from(sorted(fields)), _json).map(lambda t: {**t[0], t[1]: t[2]})


_FIELDS = {"model", "messages", "prompt", *_valid_common, "logprobs", "top_logprobs", "tools", "tool_choice",
           "parallel_tool_calls", "chat_template_kwargs", "mm_processor_kwargs", "max_completion_tokens", "echo"}


def _dumps(body) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


# --- the properties -----------------------------------------------------------------------------
@fuzz_settings(150)
@given(_chat)
@example({"model": MODEL, "messages": [{"role": "user", "content": [{"type": ["image_url"]}]}]})
@example({"model": MODEL, "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "http://[::1"}}]}]})
@example({"model": MODEL, "max_tokens": 10**30, "messages": [{"role": "user", "content": "hi"}]})
@example({"model": MODEL, "min_tokens": 10**30, "max_tokens": 10**31, "messages": [{"role": "user", "content": "hi"}]})
@example({"model": MODEL, "top_k": 2**64, "messages": [{"role": "user", "content": "hi"}]})
@example({"model": MODEL, "repetition_penalty": float("inf"), "messages": [{"role": "user", "content": "hi"}]})
@example({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
          "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]})
@example({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
          "tools": [1, {"type": "function", "function": {"name": "f"}}]})
@example({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "logprobs": True,
          "top_logprobs": 3, "n": 2, "stop": ["a", "<"], "chat_template_kwargs": {"enable_thinking": True},
          "tools": [{"type": "function", "function": {"name": "get_weather"}}]})
def test_chat_completions_any_body(pipeline, body):
    before = pipeline.backend.in_flight
    reply = pipeline.request("POST", "/v1/chat/completions", content=_dumps(body),
                             headers={**AUTH, "content-type": "application/json"})
    check_reply(pipeline, reply)
    check_idle(pipeline, before)


@fuzz_settings(100)
@given(_completion)
@example({"model": MODEL, "prompt": [10**30]})
@example({"model": MODEL, "prompt": [[1, 2], [2**64]]})
@example({"model": MODEL, "prompt": "hi", "logprobs": 5, "stream": True, "n": 3,
          "stream_options": {"include_usage": True}})
def test_completions_any_body(pipeline, body):
    before = pipeline.backend.in_flight
    reply = pipeline.request("POST", "/v1/completions", content=_dumps(body),
                             headers={**AUTH, "content-type": "application/json"})
    check_reply(pipeline, reply)
    check_idle(pipeline, before)


@fuzz_settings(200)
@given(st.one_of(st.tuples(st.just(ROUTES[0]), st.one_of(_valid_chat, _one_field_wrong(_valid_chat, _FIELDS))),
                 st.tuples(st.just(ROUTES[1]), st.one_of(_valid_completion,
                                                         _one_field_wrong(_valid_completion, _FIELDS)))))
def test_valid_bodies_and_one_field_wrong(pipeline, route_body):
    route, body = route_body
    before = pipeline.backend.in_flight
    reply = pipeline.request("POST", route, content=_dumps(body), headers=AUTH)
    check_reply(pipeline, reply)
    check_idle(pipeline, before)
    n = body.get("n", 1)
    if reply.status_code == 200 and body.get("stream") is not True and type(n) is int:
        prompt = body.get("prompt") if route == ROUTES[1] else None
        prompts = len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1
        assert len(reply.json()["choices"]) == n * prompts


@fuzz_settings(100)
@given(st.sampled_from(ROUTES), _json)
def test_generation_routes_any_json_value(pipeline, route, value):
    before = pipeline.backend.in_flight
    reply = pipeline.request("POST", route, content=_dumps(value), headers=AUTH)
    check_reply(pipeline, reply)
    check_idle(pipeline, before)


_header_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
_headers = st.dictionaries(st.sampled_from(["content-type", "accept", "x-request-id", "origin", "user-agent",
                                            "accept-encoding", "cookie", "x-forwarded-for"]),
                           st.one_of(_header_value, st.sampled_from(["application/json", "text/plain",
                                                                     "multipart/form-data; boundary=x",
                                                                     "application/json; charset=latin-1", "*/*"])),
                           max_size=3)
_auth = st.one_of(st.just(AUTH), st.just({}), st.builds(lambda v: {"Authorization": v}, st.one_of(
    _header_value, st.sampled_from([f"bearer {KEY}", f"Bearer  {KEY} ", "Bearer", f"Basic {KEY}", f"Bearer {KEY}x"]))))


@fuzz_settings(150)
@given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       st.sampled_from([*ROUTES, "/v1/models", "/health", "/metrics", "/", "/v1", "/v1/models/x", "/v1/embeddings",
                        "/health/", "/%00", "/v1/chat/completions/../models"]),
       st.one_of(st.binary(max_size=200), st.builds(_dumps, _chat), st.builds(_dumps, _json)),
       _headers, _auth, st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
@example("POST", "/v1/chat/completions", b'{"model": "tandem-default", "messages": [{"role": "user", "content": "\xff"}]}',
         {}, AUTH, {})
@example("POST", "/v1/completions", b"\xef\xbb\xbf{}", {}, AUTH, {})
@example("POST", "/v1/completions", b'{"model": "tandem-default", "prompt": "a", "max_tokens": 1e400}', {}, AUTH, {})
@example("POST", "/v1/completions", b'{"model": "tandem-default", "prompt": "a", "n": NaN}', {}, AUTH, {})
@example("POST", "/v1/chat/completions", b"[" * 100000, {}, AUTH, {})
@example("POST", "/v1/chat/completions", b"[" * 5000 + b"]" * 5000, {}, AUTH, {})
def test_any_method_path_bytes_and_headers(pipeline, method, path, content, headers, auth, params):
    kw = {} if method in ("GET", "HEAD", "OPTIONS") and not content else {"content": content}
    before = pipeline.backend.in_flight
    reply = pipeline.request(method, path, headers={**headers, **auth}, params=params, **kw)
    check_reply(pipeline, reply, allow_503=False)
    if method == "HEAD" and reply.status_code < 400:
        return
    if path in ("/v1/models",) and method == "GET":
        assert reply.status_code in (200, 401), reply.status_code
    check_idle(pipeline, before)


def test_deliberate_unhealthy_is_503_and_recovers(pipeline):
    """The one 5xx this file expects: /health while the backend says an actor is down."""
    pipeline.backend.set_health(False, "engine-0 is down")
    try:
        reply = pipeline.request("GET", "/health")
        assert reply.status_code == 503 and reply.json() == {"status": "unhealthy", "detail": "engine-0 is down"}
    finally:
        pipeline.backend.set_health(True, "ok")
    assert pipeline.request("GET", "/health").status_code == 200
    ok = pipeline.request("POST", "/v1/chat/completions", headers=AUTH,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    metrics = pipeline.request("GET", "/metrics")
    assert metrics.status_code == 200 and "tandem_" in metrics.text
