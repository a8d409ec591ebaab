"""The OpenAI API end to end: the official `openai` client against a real uvicorn serving the
app over a real in-process pipeline (preprocess + colocated engine actors on ZeroMQ ipc
sockets, the default model in float32 on CPU). Expected outputs come from a second Tandem
engine over the same weights, and usage from the tokenizer's own counts."""

import asyncio
import contextlib
import threading
import time

import httpx
import openai
import pytest

from api_pipeline import API_KEY, KV_PAGES, MODEL_NAME, PAGE_SIZE, start_pipeline
from gemma4_model.sampling import SamplingParams

SYSTEM = {"role": "system", "content": "Answer briefly."}
QUESTION = {"role": "user", "content": "What is 12 plus 30?"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        p = start_pipeline(tmp_path_factory.mktemp("run"), stack)
        yield p
        deadline = time.monotonic() + 5  # every request of the module has ended: no page may be held
        while any(p.engine.cache.pages_in_use().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(p.engine.cache.pages_in_use().values()), p.engine.cache.pages_in_use()


@pytest.fixture(scope="module")
def client(pipeline):
    return openai.OpenAI(base_url=pipeline.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


def chat_ids(pipeline, messages) -> list[int]:
    return list(pipeline.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def expected(pipeline, prompt_ids, max_tokens, ignore_eos=False, chat=False):
    """Greedy tokens, text and finish reason from Tandem's own engine, offline. `chat`: the
    content a chat client sees, without any thought channel (thinking is off)."""
    engine = pipeline.offline_engine()
    stops = () if ignore_eos else tuple(pipeline.stop_tokens)
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=stops, ignore_eos=ignore_eos)
    seq = engine.generate([prompt_ids], params)[0]
    ids = without_thought_channel(pipeline.tokenizer, seq.output) if chat else seq.output
    text = pipeline.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return seq.output, text, seq.finish_reason


def without_thought_channel(tokenizer, ids):
    """Token ids minus every `<|channel>` ... `<channel|>` span (an unclosed one to the end)."""
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<|channel>", "<channel|>"])
    out, inside = [], False
    for t in ids:
        if t == open_id:
            inside = True
        elif t == close_id:
            inside = False
        elif not inside:
            out.append(t)
    return out


def stream_text(stream):
    texts, finish, usage, roles = {}, {}, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content if hasattr(c, "delta") else c.text or "")
            if hasattr(c, "delta") and c.delta.role:
                roles.append(c.index)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage, roles


@pytest.mark.parametrize("messages", [[QUESTION], [SYSTEM, QUESTION],
                                      [SYSTEM, QUESTION, {"role": "assistant", "content": "42"},
                                       {"role": "user", "content": "And 5 plus 6?"}]],
                         ids=["single", "system", "multi-turn"])
def test_chat_greedy_matches_engine_with_exact_usage(pipeline, client, messages):
    ids = chat_ids(pipeline, messages)
    tokens, text, reason = expected(pipeline, ids, 24, chat=True)
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(tokens))
    assert r.usage.total_tokens == len(ids) + len(tokens) and r.model == MODEL_NAME and r.object == "chat.completion"

    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    texts, finish, usage, roles = stream_text(stream)
    assert texts == {0: text} and finish == {0: reason} and roles == [0]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(tokens))


def test_finish_reason_length_and_stop(pipeline, client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[QUESTION], max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    r = client.chat.completions.create(model=MODEL_NAME, messages=[QUESTION], max_tokens=60, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 60  # the model ends its turn


def test_completions_text_and_token_prompts(pipeline, client):
    prompt = "The colour of the sky is"
    ids = pipeline.tokenizer(prompt).input_ids
    tokens, text, reason = expected(pipeline, ids, 12, ignore_eos=True)
    for p in (prompt, ids):
        r = client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == text and r.choices[0].finish_reason == "length" == reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12) and r.object == "text_completion"
    texts, finish, usage, _ = stream_text(client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert texts == {0: text} and finish == {0: "length"} and usage.completion_tokens == 12


def test_stop_sequences_cut_the_text(pipeline, client):
    prompt = "Once upon a time"
    _, text, _ = expected(pipeline, pipeline.tokenizer(prompt).input_ids, 30, ignore_eos=True)
    assert len(text) > 12, text
    stop = text[5:9]  # a stop string that starts mid-text (usually across a token boundary)
    cut = text[:text.find(stop)]
    args = dict(model=MODEL_NAME, prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "\x00never"],
                extra_body={"ignore_eos": True})
    r = client.completions.create(**args)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    texts, finish, _, _ = stream_text(client.completions.create(**args, stream=True))
    assert texts == {0: cut} and finish == {0: "stop"}


def test_n_choices_and_same_seed_same_text(pipeline, client):
    args = dict(model=MODEL_NAME, messages=[QUESTION], max_tokens=16, temperature=1.0, top_p=0.95, n=2, seed=7,
                extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**args)
    b = client.chat.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 32 and a.usage.prompt_tokens == len(chat_ids(pipeline, [QUESTION]))
    texts, finish, usage, roles = stream_text(client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}))
    assert texts == {0: a.choices[0].message.content, 1: a.choices[1].message.content}
    assert finish == {0: "length", 1: "length"} and sorted(roles) == [0, 1] and usage.completion_tokens == 32


def test_logprobs(pipeline, client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[QUESTION], max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    assert r.choices[0].logprobs is not None, "the engine sent no logprobs"
    content = r.choices[0].logprobs.content
    special = set(pipeline.tokenizer.all_special_tokens)  # in logprobs, but skipped in the text
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content if e.token not in special) == r.choices[0].message.content
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)  # greedy: the top one
    c = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def post(pipeline, path, body=None, content=None, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    return httpx.post(pipeline.base_url + path, json=body, content=content, headers=headers, timeout=30)


def test_bad_inputs_are_openai_errors_and_the_server_keeps_serving(pipeline, client):
    chat = {"model": MODEL_NAME, "messages": [QUESTION]}
    long_prompt = "one two three four five six seven " * 200  # far beyond the test cache's 1024 tokens
    cases = [
        (dict(content=b'{"model": "x", "messages": [}'), 400, None),
        (dict(body={**chat, "max_tokens": "ten"}), 400, "max_tokens"),
        (dict(body={**chat, "messages": "hello"}), 400, "messages"),
        (dict(body={**chat, "messages": []}), 400, "messages"),
        (dict(body={**chat, "max_tokens": 0}), 400, "max_tokens"),
        (dict(body={**chat, "max_tokens": -1}), 400, "max_tokens"),
        (dict(body={**chat, "temperature": -0.5}), 400, "temperature"),
        (dict(body={**chat, "model": "gpt-4o"}), 404, "model"),
        (dict(body={**chat, "messages": [{"role": "user", "content": long_prompt}]}), 413, None),
        (dict(body={**chat, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}), 413, None),
    ]
    for kwargs, status, param in cases:
        for path in ("/v1/chat/completions",):
            error = error_of(post(pipeline, path, **kwargs), status)
            assert error["param"] == param, (kwargs, error)
            if status == 413 and "body" in kwargs and "stream" not in kwargs["body"]:
                stream_body = {**kwargs["body"], "stream": True}
                error_of(post(pipeline, path, body=stream_body), 413)  # streaming: still a status code
    completions = [({"model": MODEL_NAME, "prompt": []}, 400), ({"model": MODEL_NAME, "prompt": [10**6]}, 400),
                   ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 0}, 400),
                   ({"model": MODEL_NAME, "prompt": long_prompt, "stream": True}, 413)]
    for body, status in completions:
        error_of(post(pipeline, "/v1/completions", body=body), status)
    error_of(post(pipeline, "/v1/embeddings", body={"model": MODEL_NAME}), 404)
    error_of(httpx.get(pipeline.base_url + "/v1/chat/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[QUESTION])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[QUESTION], temperature=-1)
    r = client.chat.completions.create(model=MODEL_NAME, messages=[QUESTION], max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_api_key(pipeline):
    for key in ("wrong", None):
        error = error_of(post(pipeline, "/v1/chat/completions", {"model": MODEL_NAME, "messages": [QUESTION]}, key=key), 401)
        assert error["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=pipeline.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    models = openai.OpenAI(base_url=pipeline.base_url + "/v1", api_key=API_KEY).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_fail_all_ends_an_inflight_stream_within_2s(pipeline, client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=[QUESTION], max_tokens=900, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True, "min_tokens": 900})
    chunks = iter(stream)
    next(chunks)
    failed_at = time.monotonic()
    threading.Thread(target=pipeline.backend.fail_all, args=(503, "request aborted: decode-0 exited")).start()
    with pytest.raises(openai.APIError) as info:
        for _ in chunks:
            pass
    assert time.monotonic() - failed_at < 2
    assert "decode-0" in str(info.value)
    r = client.chat.completions.create(model=MODEL_NAME, messages=[QUESTION], max_tokens=3, temperature=0)
    assert r.choices[0].message.content is not None  # still serving


def test_client_disconnect_cancels_the_request(pipeline):
    body = {"model": MODEL_NAME, "messages": [QUESTION], "max_tokens": 900, "stream": True,
            "ignore_eos": True, "min_tokens": 900}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", pipeline.base_url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 3
    while pipeline.backend.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pipeline.backend.in_flight == 0
    while any(pipeline.engine.cache.pages_in_use().values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(pipeline.engine.cache.pages_in_use().values())  # the engine dropped it long before 900 tokens


def test_concurrent_streams_health_and_metrics(pipeline):
    messages = [QUESTION]
    _, text, _ = expected(pipeline, chat_ids(pipeline, messages), 20, ignore_eos=True, chat=True)

    async def one(aclient):
        stream = await aclient.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def many():
        aclient = openai.AsyncOpenAI(base_url=pipeline.base_url + "/v1", api_key=API_KEY, max_retries=0)
        return await asyncio.gather(*(one(aclient) for _ in range(12)))

    assert asyncio.run(many()) == [text] * 12
    health = httpx.get(pipeline.base_url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    pipeline.backend.set_health(False, "decode-0 exited")
    try:
        health = httpx.get(pipeline.base_url + "/health")
        assert health.status_code == 503 and "decode-0" in health.json()["detail"]
    finally:
        pipeline.backend.set_health(True, "ok")
    metrics = httpx.get(pipeline.base_url + "/metrics").text
    assert 'tandem_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    assert "tandem_time_to_first_token_seconds_count" in metrics and "tandem_request_latency_seconds_bucket" in metrics
    assert f'tandem_kv_pages_total{{actor="engine",replica="0"}} {2 * KV_PAGES}.0' in metrics
    assert 'tandem_decode_batch_size{actor="engine",replica="0"}' in metrics
