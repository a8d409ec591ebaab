"""Request validation: every bad field is a 400 that names it; extra fields are ignored; the
engine requests carry the sampling fields, n copies and seeds seed + i."""

import json

import pytest

from api.errors import ApiError
from api.generation import engine_requests
from api.schema import ChatCompletionRequest, CompletionRequest, parse_body

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("change, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"top_logprobs": 3}, None),  # needs logprobs: a model-level error
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stream": "yes please"}, "stream"),
    ({"model": 3}, "model"),
])
def test_bad_chat_fields_are_400_naming_the_field(change, param):
    with pytest.raises(ApiError) as info:
        parse_body(ChatCompletionRequest, {**CHAT, **change})
    assert info.value.status == 400
    assert info.value.param == param
    body = info.value.body()["error"]
    assert body["type"] == "invalid_request_error" and body["message"]


def test_missing_model_and_non_object_body():
    with pytest.raises(ApiError) as info:
        parse_body(ChatCompletionRequest, {"messages": CHAT["messages"]})
    assert info.value.param == "model"
    with pytest.raises(ApiError) as info:
        parse_body(ChatCompletionRequest, [CHAT])
    assert info.value.status == 400


def test_extra_fields_ignored_and_options_read():
    body = parse_body(ChatCompletionRequest, {
        **CHAT, "user": "me", "parallel_tool_calls": False, "stop": "END", "stream": True,
        "stream_options": {"include_usage": True}, "max_completion_tokens": 7, "max_tokens": 3,
        "logprobs": True, "top_logprobs": 2, "chat_template_kwargs": {"enable_thinking": True},
    })
    assert body.stop_strings == ["END"] and body.include_usage and body.token_limit == 7 and body.top_count == 2
    assert parse_body(ChatCompletionRequest, CHAT).top_count is None


@pytest.mark.parametrize("prompt, expected", [
    ("text", ["text"]),
    (["a", "b"], ["a", "b"]),
    ([5, 6, 7], [[5, 6, 7]]),
    ([[5, 6], [7]], [[5, 6], [7]]),
])
def test_completion_prompt_forms(prompt, expected):
    assert parse_body(CompletionRequest, {"model": "m", "prompt": prompt}).prompts == expected


@pytest.mark.parametrize("prompt", [[], [[]], [""], [1, -2], {"text": "x"}])
def test_bad_completion_prompts(prompt):
    with pytest.raises(ApiError) as info:
        parse_body(CompletionRequest, {"model": "m", "prompt": prompt})
    assert info.value.status == 400 and info.value.param.startswith("prompt")


def test_engine_requests_n_seeds_and_sampling():
    body = parse_body(ChatCompletionRequest, {**CHAT, "n": 3, "seed": 10, "temperature": 0.5, "top_k": -1,
                                               "max_tokens": 9, "logprobs": True, "tools": [{"type": "function"}],
                                               "chat_template_kwargs": {"enable_thinking": True}})
    reqs = engine_requests(body, default_max_tokens=64)
    assert [r.sampling.seed for r in reqs] == [10, 11, 12]
    assert len({r.request_id for r in reqs}) == 3
    spec = reqs[0].sampling
    assert (spec.max_tokens, spec.temperature, spec.top_k, spec.logprobs) == (9, 0.5, 0, 0)
    chat = json.loads(reqs[0].messages_json)
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert chat["chat_template_kwargs"] == {"enable_thinking": True} and chat["tools"] == [{"type": "function"}]

    completion = parse_body(CompletionRequest, {"model": "m", "prompt": ["x", "y"], "n": 2})
    reqs = engine_requests(completion, default_max_tokens=64)
    assert [(r.prompt_text, r.prompt_ids) for r in reqs] == [("x", None), ("x", None), ("y", None), ("y", None)]
    assert all(r.sampling.seed is None and r.sampling.max_tokens == 16 for r in reqs)
    ids = engine_requests(parse_body(CompletionRequest, {"model": "m", "prompt": [[3, 4], [5]]}), 64)
    assert [r.prompt_ids for r in ids] == [[3, 4], [5]]


def test_min_tokens_above_max_tokens_is_400():
    body = parse_body(ChatCompletionRequest, {**CHAT, "max_tokens": 2, "min_tokens": 5})
    with pytest.raises(ApiError) as info:
        engine_requests(body, default_max_tokens=64)
    assert info.value.param == "min_tokens"
