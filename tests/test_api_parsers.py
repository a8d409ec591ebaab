"""Gemma 4 reasoning and tool-call output parsing: the parsers alone over every split of the
model text, the request fields, the chat template round trip, and end to end with the embedded
default model through the api pipeline and the `openai` client (streaming and not)."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import zlib

import openai
import pytest

from actors.preprocess import Preprocessor
from api.chat_output import ChatOutput, ChatOutputConfig
from api.errors import ApiError
from api.generation import chat_output_config, engine_requests
from api.schema import ChatCompletionRequest, parse_body
from api_pipeline import API_KEY, MODEL_NAME, start_pipeline
from default_model.tasks import TIME_TOOL, WEATHER_TOOL
from gemma4_model.sampling import SamplingParams

Q = '<|"|>'
THINK = ChatOutputConfig(thinking=True)
TOOLS = ChatOutputConfig(parse_tools=True)
BOTH = ChatOutputConfig(thinking=True, parse_tools=True)


# --- the parsers alone ------------------------------------------------------------------------
def ids():
    return (f"call_{i}" for i in itertools.count())


def run(chunks, config):
    """Feed chunks; the whole result as a full body sees it and as a stream client assembles it."""
    ids_ = ids()
    out = ChatOutput(config, id_factory=lambda: next(ids_))
    deltas = [out.feed(c) for c in chunks] + [out.flush()]
    streamed = {"reasoning": "", "content": "", "calls": []}
    for d in deltas:
        streamed["reasoning"] += d.reasoning
        streamed["content"] += d.content
        for call in d.tool_calls:
            if "id" in call:  # a call's first delta: index, id, type, name, empty arguments
                assert call["index"] == len(streamed["calls"]) and call["type"] == "function"
                assert call["function"]["arguments"] == "" and call["function"]["name"]
                streamed["calls"].append({"id": call["id"], "name": call["function"]["name"], "arguments": "",
                                          "prefixes": []})
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                entry = streamed["calls"][call["index"]]
                entry["arguments"] += call["function"]["arguments"]
                entry["prefixes"].append(entry["arguments"])
    full = {"reasoning": out.reasoning_text or "", "content": out.content_text,
            "calls": [{"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                      for c in out.calls]}
    for call in streamed["calls"]:
        final = json.loads(call["arguments"])
        for prefix in call.pop("prefixes"):
            assert_complete_values(prefix, final)
    assert streamed == full
    return full


def close_json(prefix: str) -> str:
    """A prefix of JSON text completed with the brackets it leaves open."""
    stack, in_string, escaped = [], False, False
    for ch in prefix:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            stack.pop()
    assert not in_string, f"a fragment ends inside a string: {prefix!r}"
    return prefix.rstrip().rstrip(",") + "".join(reversed(stack))


def assert_complete_values(prefix: str, final) -> None:
    """Every value sent so far is already its final value (no number or string that may still grow)."""
    def within(part, whole):
        if isinstance(part, dict):
            assert isinstance(whole, dict) and set(part) <= set(whole), (part, whole)
            for k, v in part.items():
                within(v, whole[k])
        elif isinstance(part, list):
            assert isinstance(whole, list) and len(part) <= len(whole), (part, whole)
            for v, w in zip(part, whole):
                within(v, w)
        else:
            assert part == whole and type(part) is type(whole), (part, whole)

    within(json.loads(close_json(prefix)), final)


def splits(text: str, seed: int, count: int):
    """One chunk per character, the whole text, and `count` random splittings."""
    yield list(text)
    yield [text]
    rng = random.Random(seed)
    for _ in range(count if len(text) > 1 else 0):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(12, len(text) - 1))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def same_for_every_split(text: str, config: ChatOutputConfig, seed: int = 0, count: int = 300):
    whole = run([text], config)
    for chunks in splits(text, seed, count):
        assert run(chunks, config) == whole, chunks
    return whole


def call(name: str, args: str) -> str:
    return f"<|tool_call>call:{name}{{{args}}}<tool_call|>"


NESTED = (f"filter:{{tags:[{Q}a,b{Q},{Q}{{c}}{Q}],range:{{min:-1.5,max:2e3}},deep:{{x:[[1],[],{{y:null}}]}}}},"
          f"flag:true,off:false,none:null,{Q}quoted key{Q}:{Q}v{Q},count:120")
TRICKY = f'text:{Q}He said "hi", {{not: an object}} [1,2]\nnew line, ünïcødé 東京 🌧{Q},n:7'

CASES = {
    "thinking": ("<|channel>thought\nLet me see: 2 < 3, \"quotes\" {x}\nok<channel|>The answer is 5.", THINK,
                 {"reasoning": "Let me see: 2 < 3, \"quotes\" {x}\nok", "content": "The answer is 5.", "calls": []}),
    "single call": (call("get_weather", f"location:{Q}Paris{Q}") , TOOLS,
                    {"reasoning": "", "content": "",
                     "calls": [{"id": "call_0", "name": "get_weather", "arguments": '{"location": "Paris"}'}]}),
    "content then calls": ("Let me check. " + call("get_weather", f"location:{Q}Paris{Q},unit:{Q}celsius{Q}")
                           + call("get_time", f"location:{Q}Tokyo{Q}"), TOOLS,
                           {"reasoning": "", "content": "Let me check. ", "calls": [
                               {"id": "call_0", "name": "get_weather",
                                "arguments": '{"location": "Paris", "unit": "celsius"}'},
                               {"id": "call_1", "name": "get_time", "arguments": '{"location": "Tokyo"}'}]}),
    "nested": (call("search", NESTED), TOOLS, {"reasoning": "", "content": "", "calls": [
        {"id": "call_0", "name": "search", "arguments": json.dumps({
            "filter": {"tags": ["a,b", "{c}"], "range": {"min": -1.5, "max": 2e3}, "deep": {"x": [[1], [], {"y": None}]}},
            "flag": True, "off": False, "none": None, "quoted key": "v", "count": 120}).replace("2000.0", "2e3")}]}),
    "quotes unicode newlines": (call("note", TRICKY), TOOLS, {"reasoning": "", "content": "", "calls": [
        {"id": "call_0", "name": "note", "arguments": json.dumps(
            {"text": 'He said "hi", {not: an object} [1,2]\nnew line, ünïcødé 東京 🌧', "n": 7}, ensure_ascii=False)}]}),
    "number at the end": (call("add", "a:12,b:-345.25") + call("none", ""), TOOLS, {"reasoning": "", "content": "",
                          "calls": [{"id": "call_0", "name": "add", "arguments": '{"a": 12, "b": -345.25}'},
                                    {"id": "call_1", "name": "none", "arguments": "{}"}]}),
    "thinking then call": ("<|channel>thought\nI need the weather.<channel|>" + call("get_weather", f"location:{Q}Oslo{Q}"),
                           BOTH, {"reasoning": "I need the weather.", "content": "",
                                  "calls": [{"id": "call_0", "name": "get_weather", "arguments": '{"location": "Oslo"}'}]}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_split_gives_the_whole_text_result(name):
    text, config, want = CASES[name]
    assert same_for_every_split(text, config, seed=zlib.crc32(name.encode())) == want


def test_thinking_off_strips_any_thought_channel():
    text = "<|channel>thought\nsecret plan<channel|>42"
    assert same_for_every_split(text, ChatOutputConfig()) == {"reasoning": "", "content": "42", "calls": []}
    # A channel left open (the output ended while thinking) shows nothing either; a stray close is dropped.
    assert same_for_every_split("<|channel>thought\nstill thinking", ChatOutputConfig())["content"] == ""
    assert same_for_every_split("a<channel|>b", ChatOutputConfig())["content"] == "ab"
    # After a tool response with thinking on, the prompt itself opened the channel.
    config = ChatOutputConfig(thinking=True, start_in_reasoning=True)
    assert same_for_every_split("It is sunny.<channel|>Sunny, 21 degrees.", config) == {
        "reasoning": "It is sunny.", "content": "Sunny, 21 degrees.", "calls": []}


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = "x" + call("a", "k:1") + call("b", "k:2")
    got = same_for_every_split(text, ChatOutputConfig(parse_tools=True, max_calls=1))
    assert got["content"] == "x" and [c["name"] for c in got["calls"]] == ["a"]


def test_without_tool_parsing_calls_stay_text():
    text = "x" + call("a", "k:1")
    assert same_for_every_split(text, ChatOutputConfig()) == {"reasoning": "", "content": text, "calls": []}


MALFORMED = {  # text -> (content, calls as (name, arguments))
    "unterminated header": ("hi <|tool_call>call:get_wea", "hi <|tool_call>call:get_wea", []),
    "not a call": ("<|tool_call>hello{a:1}<tool_call|>", "<|tool_call>hello{a:1}<tool_call|>", []),
    "bad name": ("<|tool_call>call:get weather{a:1}<tool_call|>", "<|tool_call>call:get weather{a:1}<tool_call|>", []),
    "empty name": ("<|tool_call>call:{a:1}<tool_call|>", "<|tool_call>call:{a:1}<tool_call|>", []),
    "bad args": (f"<|tool_call>call:f{{a:1,b {Q}x{Q}}}<tool_call|>after", f",b {Q}x{Q}}}<tool_call|>after",
                 [("f", '{"a": 1}')]),
    "unterminated string": (f"<|tool_call>call:f{{a:[1,{{b:2}}],c:{Q}never closed", f",c:{Q}never closed",
                            [("f", '{"a": [1, {"b": 2}]}')]),
    "unterminated number": ("<|tool_call>call:f{a:{b:12", "b:12", [("f", '{"a": {}}')]),
    "missing close brace": ("<|tool_call>call:f{a:1<tool_call|>", "a:1<tool_call|>", [("f", "{}")]),
    "empty value": ("<|tool_call>call:f{a:,b:2}<tool_call|>", "a:,b:2}<tool_call|>", [("f", "{}")]),
    "second call broken": ("<|tool_call>call:f{a:1}<tool_call|><|tool_call>call:g{x:[1,2", "2",
                           [("f", '{"a": 1}'), ("g", '{"x": [1]}')]),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_output_degrades_to_content(name):
    """Never an exception: before a call's name is announced its text is content; after, the call
    closes with the values completed so far (valid JSON) and the rest of its text is content."""
    text, content, calls = MALFORMED[name]
    for config in (TOOLS, BOTH):
        got = same_for_every_split(text, config, count=100)
        assert got["content"].endswith(content) and [(c["name"], c["arguments"]) for c in got["calls"]] == calls
        assert all(isinstance(json.loads(c["arguments"]), dict) for c in got["calls"])


def test_random_garbage_never_raises():
    rng = random.Random(7)
    alphabet = ["<|tool_call>", "<tool_call|>", Q, "<|channel>", "<channel|>", "call:", "f", "{", "}", "[", "]",
                ",", ":", "1", "-", ".", "a", " ", "\n", "true", "é"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        same_for_every_split(text, BOTH, seed=rng.randint(0, 1000), count=5)


# --- request fields -----------------------------------------------------------------------------
def body(**fields) -> ChatCompletionRequest:
    return parse_body(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_tool_choice_fields_reach_the_engine_request_and_template():
    tools = [WEATHER_TOOL, TIME_TOOL]
    auto = engine_requests(body(tools=tools), 16)[0]
    assert json.loads(auto.messages_json)["tools"] == tools and auto.sampling.tool_choice is None
    assert chat_output_config(body(tools=tools)) == ChatOutputConfig(parse_tools=True)
    none = engine_requests(body(tools=tools, tool_choice="none"), 16)[0]
    assert "tools" not in json.loads(none.messages_json) and not chat_output_config(body(tools=tools, tool_choice="none")).parse_tools
    assert engine_requests(body(tools=tools, tool_choice="required"), 16)[0].sampling.tool_choice == "required"
    named = {"type": "function", "function": {"name": "get_time"}}
    assert engine_requests(body(tools=tools, tool_choice=named), 16)[0].sampling.tool_choice == "function:get_time"
    assert chat_output_config(body(tools=tools, parallel_tool_calls=False)).max_calls == 1
    thinking = body(chat_template_kwargs={"enable_thinking": True})
    assert chat_output_config(thinking) == ChatOutputConfig(thinking=True)
    for bad, param in [({"tool_choice": "required"}, None), ({"tools": tools, "tool_choice": "sometimes"}, "tool_choice"),
                       ({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None)]:
        with pytest.raises(ApiError) as err:
            body(**bad)
        assert err.value.status == 400 and (param is None or (err.value.param or "").startswith(param))


def test_openai_tool_messages_render_like_the_native_ones(pipeline):
    """An assistant message with content null and JSON-string arguments, then a `tool` message,
    render exactly as the mapping form the default model was trained on."""
    pre = Preprocessor(pipeline.tokenizer, [])
    result = {"temperature": 21, "condition": "sunny", "unit": "celsius"}
    openai_shape = [{"role": "user", "content": "What's the weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_x", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"location": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "call_x", "content": json.dumps(result)}]
    req = engine_requests(body(messages=openai_shape, tools=[WEATHER_TOOL]), 16)[0]
    native = list(openai_shape)
    native[1] = {"role": "assistant", "tool_calls": [{"id": "call_x", "type": "function", "function": {
        "name": "get_weather", "arguments": {"location": "Paris"}}}]}
    want = pipeline.tokenizer.apply_chat_template(native, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    assert f'<|tool_call>call:get_weather{{location:{Q}Paris{Q}}}<tool_call|><|tool_response>response:get_weather' in want
    assert pre.prefill_job(req).token_ids.tolist() == pipeline.tokenizer(want, add_special_tokens=False).input_ids


# --- end to end with the default model ----------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        yield start_pipeline(tmp_path_factory.mktemp("run"), stack)


@pytest.fixture(scope="module")
def client(pipeline):
    return openai.OpenAI(base_url=pipeline.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def offline(pipeline, messages, tools=None, thinking=False, max_tokens=48):
    """The offline engine's greedy output split at the markers: (thought text, the rest's text)."""
    prompt = pipeline.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                                    enable_thinking=thinking)
    ids = pipeline.tokenizer(prompt, add_special_tokens=False).input_ids
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=tuple(pipeline.stop_tokens))
    out = pipeline.offline_engine().generate([ids], params)[0].output
    open_id, close_id = pipeline.tokenizer.convert_tokens_to_ids(["<|channel>", "<channel|>"])
    thought = out[out.index(open_id) + 1:out.index(close_id)] if open_id in out and close_id in out else []
    rest = out[out.index(close_id) + 1:] if close_id in out else out
    decode = lambda t: pipeline.tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return decode(thought).removeprefix("thought\n"), decode(rest)


def collect_stream(stream):
    reasoning, content, calls, finish = "", "", [], None
    for chunk in stream:
        for c in chunk.choices:
            delta = c.delta.model_dump()
            reasoning += delta.get("reasoning_content") or ""
            assert (delta.get("reasoning_content") or "") == (delta.get("reasoning") or "")
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                if tc.get("id"):
                    assert tc["index"] == len(calls) and tc["function"]["arguments"] == "" and tc["type"] == "function"
                    calls.append({"id": tc["id"], "name": tc["function"]["name"], "arguments": ""})
                else:
                    assert tc.get("function", {}).get("name") is None
                    calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
            finish = c.finish_reason or finish
    return reasoning, content, calls, finish


WEATHER_Q = {"role": "user", "content": "What's the weather in Paris?"}
RESULT = {"temperature": 21, "condition": "sunny", "unit": "celsius"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_weather_tool_call_round_trip(pipeline, client, stream):
    tools = [WEATHER_TOOL, TIME_TOOL]
    kwargs = dict(model=MODEL_NAME, tools=tools, temperature=0, max_tokens=48)
    if stream:
        _, content, calls, finish = collect_stream(client.chat.completions.create(messages=[WEATHER_Q], stream=True, **kwargs))
    else:
        r = client.chat.completions.create(messages=[WEATHER_Q], **kwargs)
        message, finish = r.choices[0].message, r.choices[0].finish_reason
        content = message.content or ""
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]
        assert message.reasoning_content is None
    assert finish == "tool_calls" and content == ""
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"location": "Paris"}
    assert calls[0]["id"].startswith("call_") and len(calls[0]["id"]) > 10

    history = [WEATHER_Q, {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0]["id"], "type": "function", "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": json.dumps(RESULT)}]
    if stream:
        _, answer, more, finish = collect_stream(client.chat.completions.create(messages=history, stream=True, **kwargs))
    else:
        r = client.chat.completions.create(messages=history, **kwargs)
        answer, more, finish = r.choices[0].message.content, r.choices[0].message.tool_calls, r.choices[0].finish_reason
    native = [WEATHER_Q, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": {"location": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c", "content": json.dumps(RESULT)}]
    assert answer == offline(pipeline, native, tools)[1] and finish == "stop" and not more
    assert "21" in answer and "sunny" in answer  # the answer uses the tool's response


ADD_Q = {"role": "user", "content": "What is 12 + 30?"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_thinking_on_separates_reasoning_from_the_answer(pipeline, client, stream):
    thought, answer = offline(pipeline, [ADD_Q], thinking=True)
    assert thought  # the model does think here
    kwargs = dict(model=MODEL_NAME, messages=[ADD_Q], temperature=0, max_tokens=48,
                  extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    if stream:
        reasoning, content, calls, finish = collect_stream(client.chat.completions.create(stream=True, **kwargs))
    else:
        r = client.chat.completions.create(**kwargs)
        m = r.choices[0].message
        reasoning, content, calls, finish = m.reasoning_content, m.content, m.tool_calls, r.choices[0].finish_reason
        assert m.reasoning == reasoning
    assert (reasoning, content, finish) == (thought, answer, "stop") and not calls
    assert "<|channel>" not in content and "thought" not in content


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_thinking_off_gives_no_reasoning(pipeline, client, stream):
    # With this system prompt the model writes a thought channel even with thinking off: none of it may show.
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 plus 30?"}]
    thought, answer = offline(pipeline, messages)
    kwargs = dict(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=48)
    if stream:
        reasoning, content, _, finish = collect_stream(client.chat.completions.create(stream=True, **kwargs))
        assert reasoning == ""
    else:
        r = client.chat.completions.create(**kwargs)
        reasoning, content, finish = r.choices[0].message.reasoning_content, r.choices[0].message.content, r.choices[0].finish_reason
        assert reasoning is None and r.choices[0].message.reasoning is None
    assert content == answer and finish == "stop"
    assert not thought or thought not in content


def test_tool_choice_none_sends_no_tools_to_the_template(pipeline, client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[WEATHER_Q], tools=[WEATHER_TOOL], tool_choice="none",
                                       temperature=0, max_tokens=16)
    plain = pipeline.tokenizer.apply_chat_template([WEATHER_Q], tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(pipeline.tokenizer(plain, add_special_tokens=False).input_ids)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"
    forced = client.chat.completions.create(model=MODEL_NAME, messages=[WEATHER_Q], tools=[WEATHER_TOOL],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            parallel_tool_calls=False, temperature=0, max_tokens=48)
    assert [c.function.name for c in forced.choices[0].message.tool_calls] == ["get_weather"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[WEATHER_Q], tool_choice="required", max_tokens=4)


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_is_enforced_even_against_the_models_preference(pipeline, client, stream):
    """A weather question with tool_choice get_time: the grammar makes the model call get_time."""
    kwargs = dict(model=MODEL_NAME, messages=[WEATHER_Q], tools=[WEATHER_TOOL, TIME_TOOL], temperature=0,
                  max_tokens=48, tool_choice={"type": "function", "function": {"name": "get_time"}})
    free = client.chat.completions.create(**{**kwargs, "tool_choice": "auto", "stream": False})
    assert [c.function.name for c in free.choices[0].message.tool_calls] == ["get_weather"]  # its own choice
    if stream:
        names, finish = "", None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for call in chunk.choices[0].delta.tool_calls or []:
                names += call.function.name or ""
            finish = chunk.choices[0].finish_reason or finish
    else:
        reply = client.chat.completions.create(**kwargs)
        names, finish = "".join(c.function.name for c in reply.choices[0].message.tool_calls), reply.choices[0].finish_reason
        assert "location" in json.loads(reply.choices[0].message.tool_calls[0].function.arguments)
    assert names == "get_time" and finish == "tool_calls"
