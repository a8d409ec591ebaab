"""The front door (issue 5): API key, body limit, media URLs only from allowed hosts, request
timeouts, CORS only when configured, loopback by default; after each refusal the server serves."""

from __future__ import annotations

import contextlib
import time

import httpx
import openai
import pytest

from tests.api_pipeline import API_KEY, MODEL_NAME, start_pipeline
from topology.config import ApiSection, load_topology, parse_topology, TopologyError

ALLOWED = "media.example.com"
ORIGIN = "https://app.example"
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        p = start_pipeline(tmp_path_factory.mktemp("run"), stack, request_timeout_s=TIMEOUT_S,
                           allowed_media_hosts=(ALLOWED, ".cdn.example"), cors_origins=(ORIGIN,),
                           default_chat_template_kwargs={"enable_thinking": True})
        yield p
        deadline = time.monotonic() + 5  # timed-out requests were cancelled: their pages are free
        while any(p.engine.cache.pages_in_use().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(p.engine.cache.pages_in_use().values()), p.engine.cache.pages_in_use()


def _post(pipeline, body, key=API_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{pipeline.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30, **kw)


def _still_serving(pipeline):
    ok = _post(pipeline, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Add 2 and 3."}],
                          "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200, ok.text


def _error(reply, status):
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    return error


def _image(url):
    return {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What colour is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_key_is_401(pipeline, key):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
    assert _error(_post(pipeline, body, key=key), 401)["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=pipeline.base_url + "/v1", api_key=key or "none", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    _still_serving(pipeline)


def test_oversized_body_is_413(pipeline):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * (80 << 10)}]}
    _error(_post(pipeline, body), 413)
    _still_serving(pipeline)


@pytest.mark.parametrize("url", ["https://evil.example.net/cat.png", "http://169.254.169.254/latest/meta-data",
                                 f"https://{ALLOWED}.evil.net/x.png", "file:///etc/passwd", "ftp://media.example.com/a"])
def test_media_url_from_a_host_not_allowed_is_400(pipeline, url):
    error = _error(_post(pipeline, _image(url)), 400)
    assert error["param"] == "messages.0.content.1"
    assert "not allowed" in error["message"] or "scheme" in error["message"]
    _still_serving(pipeline)


@pytest.mark.parametrize("url", [f"https://{ALLOWED}/red.png", "https://img.cdn.example/red.png",
                                 "data:image/png;base64,iVBORw0KGgo="])
def test_allowed_media_is_refused_only_for_want_of_an_encoder(pipeline, url):
    """Allowed sources pass the host check; this topology has no vision encoder, which the error says."""
    error = _error(_post(pipeline, _image(url)), 400)
    assert "no image encoder" in error["message"]


def test_request_timeout_ends_requests_with_504(pipeline):
    long = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Copy: a b c"}], "max_tokens": 900,
            "ignore_eos": True}
    started = time.monotonic()
    error = _error(_post(pipeline, long), 504)
    assert "timeout" in error["message"] and time.monotonic() - started < TIMEOUT_S + 2
    client = openai.OpenAI(base_url=pipeline.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
    stream = client.chat.completions.create(stream=True, model=MODEL_NAME, messages=long["messages"],
                                            max_tokens=900, extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError, match="timeout"):
        for _ in stream:
            pass
    _still_serving(pipeline)


def test_cors_only_for_the_configured_origin(pipeline):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{pipeline.base_url}/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.headers.get("access-control-allow-origin") == ORIGIN
    other = httpx.options(f"{pipeline.base_url}/v1/chat/completions",
                          headers={"Origin": "https://other.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_server_default_thinking_and_the_request_overriding_it(pipeline):
    question = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 40,
                "messages": [{"role": "user", "content": "Compute 17 plus 25."}]}
    default = _post(pipeline, question).json()["choices"][0]["message"]
    assert "17 + 25 = 42" in default["reasoning_content"] and default["content"].strip() == "42"
    off = _post(pipeline, {**question, "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert not off["choices"][0]["message"].get("reasoning_content")
    assert off["choices"][0]["message"]["content"].strip() == "42"


def test_defaults_loopback_no_cors_no_media_hosts():
    api = load_topology("topology/examples/cpu_colocated.toml").api
    assert (api.host, api.cors_origins, api.allowed_media_hosts) == ("127.0.0.1", (), ())
    raw = {"nodes": {"local": {}}, "actors": [{"kind": "preprocess"}, {"kind": "engine"}]}
    assert parse_topology(raw).api == ApiSection("127.0.0.1", 8000, None)
    with pytest.raises(TopologyError, match="api.allowed_media_hosts"):
        parse_topology({**raw, "api": {"allowed_media_hosts": "everything"}})
