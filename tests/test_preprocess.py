"""Preprocess: chat template + tokenization into a PrefillJob; bad input becomes a 400."""

import json

import pytest
from transformers import AutoTokenizer

from actors.messages import GenerateRequest, SamplingSpec
from actors.preprocess import Preprocessor
from default_model import CHECKPOINT
from default_model.tasks import WEATHER_TOOL


@pytest.fixture(scope="module")
def pre():
    return Preprocessor(AutoTokenizer.from_pretrained(CHECKPOINT), stop_token_ids=[1, 106])


def request(body, **sampling):
    return GenerateRequest("r1", json.dumps(body), SamplingSpec(**sampling))


def test_renders_the_chat_template_with_tools_and_thinking(pre):
    body = {"messages": [{"role": "user", "content": "What's the weather in Oslo?"}], "tools": [WEATHER_TOOL],
            "chat_template_kwargs": {"enable_thinking": True}}
    job = pre.prefill_job(request(body, stop_token_ids=[7]))
    text = pre.tokenizer.decode(job.token_ids.tolist())
    assert text.startswith("<bos><|turn>system\n<|think|>") and "declaration:get_weather" in text
    assert text.endswith("<|turn>model\n") and job.sampling.stop_token_ids == [1, 7, 106]


def _call(arguments):
    return {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                 "function": {"name": "get_weather", "arguments": arguments}}]}


def test_openai_style_tool_call_arguments_are_parsed_for_the_template(pre):
    history = [{"role": "user", "content": "Weather in Oslo?"}, _call('{"location": "Oslo"}'),
               {"role": "tool", "tool_call_id": "c", "content": '{"temperature": 3}'}]
    job = pre.prefill_job(request({"messages": history, "tools": [WEATHER_TOOL]}))
    text = pre.tokenizer.decode(job.token_ids.tolist())
    assert '<|tool_call>call:get_weather{location:<|"|>Oslo<|"|>}<tool_call|>' in text


@pytest.mark.parametrize(
    "raw, problem",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"messages": []}), "non-empty 'messages'"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": 3}), "must be an object"),
        (json.dumps({"messages": [_call("[1, 2]")]}), "must be a JSON object"),
        (json.dumps({"messages": [_call("{oops")]}), "not valid JSON"),
        (json.dumps({"messages": [_call(5)]}), "cannot render"),
    ],
)
def test_bad_requests_are_refused_with_a_message(pre, raw, problem):
    with pytest.raises(ValueError, match=problem):
        pre.prefill_job(GenerateRequest("r", raw, SamplingSpec()))


def test_actor_forwards_jobs_and_reports_errors_over_sockets(pre):
    import threading

    import zmq

    from actors.messages import PrefillJob, RequestError
    from actors.preprocess import PreprocessActor
    from actors.transport import pull, push

    ctx = zmq.Context()
    inbox, down, errs = pull(ctx, "inproc://pre-in"), push(ctx, "inproc://pre-down", bind=True), push(ctx, "inproc://pre-err", bind=True)
    client, jobs, errors = push(ctx, "inproc://pre-in"), pull(ctx, "inproc://pre-down", bind=False), pull(ctx, "inproc://pre-err", bind=False)
    stop = threading.Event()
    thread = threading.Thread(target=PreprocessActor(pre, inbox, down, errs).run, args=(stop,))
    thread.start()
    try:
        client.send(request({"messages": [{"role": "user", "content": "What is 2 + 2?"}]}))
        client.send(GenerateRequest("bad", "{", SamplingSpec()))
        job, error = jobs.recv(timeout_ms=10_000), errors.recv(timeout_ms=10_000)
        assert isinstance(job, PrefillJob) and job.request_id == "r1" and len(job.token_ids) > 5
        assert isinstance(error, RequestError) and error.request_id == "bad" and error.code == 400
    finally:
        stop.set()
        thread.join(timeout=10)
        for ch in (inbox, down, errs, client, jobs, errors):
            ch.close()
        ctx.term()


def test_dispatch_tells_each_encoder_replica_how_many_of_a_requests_jobs_it_gets():
    """Media items go to encoder replicas by content hash; each job carries the count of its
    request's jobs sent to that replica, which the encoder waits for to batch them."""
    import zlib

    import numpy as np

    from actors.media_inputs import ProcessedMedia
    from actors.messages import PrefillJob, SamplingSpec
    from actors.preprocess import Prepared, PreprocessActor

    class Sink:
        def __init__(self):
            self.sent = []

        def send(self, msg):
            self.sent.append(msg)

    def image(key):
        return ProcessedMedia("image", key, 4, "<img>", pixel_values=np.zeros((4, 6), np.float32),
                              position_ids=np.zeros((4, 2), np.int32))

    keys = [f"key-{i}" for i in range(40)]
    on_0 = [k for k in keys if zlib.crc32(k.encode()) % 2 == 0][:3]
    on_1 = [k for k in keys if zlib.crc32(k.encode()) % 2 == 1][:1]
    replicas, engine = [Sink(), Sink()], Sink()
    actor = PreprocessActor(None, None, [engine], Sink(), encoders={"vision_encoder": replicas})
    job = PrefillJob("r1", np.arange(5, dtype=np.int32), SamplingSpec())
    actor.dispatch(Prepared(job, [image(on_0[0]), image(on_1[0]), image(on_0[1]), image(on_0[2])]))
    assert [(j.media_index, j.siblings) for j in replicas[0].sent] == [(0, 3), (2, 3), (3, 3)]
    assert [(j.media_index, j.siblings) for j in replicas[1].sent] == [(1, 1)]
    assert engine.sent == [job]
